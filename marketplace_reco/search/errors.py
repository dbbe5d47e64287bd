"""Errors of the listing search. Every message says what was wrong and where (which id, which row, which file).

``IndexInputError`` and its subclasses are the caller's mistakes (a bad query, an unknown listing id, an index of
another model revision): the HTTP layer answers them with a 4xx status. The others are failures of the index itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._checkpoint_io import CheckpointError

# How many offending ids a message lists; the exception keeps them all.
_SHOWN_IDS = 10


def _shown(ids: Sequence[str]) -> str:
    listed = ", ".join(repr(listing_id) for listing_id in ids[:_SHOWN_IDS])
    return listed + (f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else "")


class SearchError(Exception):
    """Base class of the search package's errors."""


class IndexInputError(SearchError, ValueError):
    """Bad input to an index (vectors, ids, k, filters); the message names the argument and the row or id."""


class UnknownListingError(IndexInputError, KeyError):
    """Listing ids that the index (or the products table) does not hold; nothing was changed."""

    def __init__(self, listing_ids: Sequence[str], where: str) -> None:
        super().__init__(f"{len(listing_ids)} listing id(s) not in {where}: {_shown(listing_ids)}")
        self.listing_ids = list(listing_ids)

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class DuplicateListingError(IndexInputError):
    """Listing ids given twice in one call, or added although the index holds them already; nothing was changed."""

    def __init__(self, listing_ids: Sequence[str], reason: str) -> None:
        super().__init__(f"{len(listing_ids)} listing id(s) {reason}: {_shown(listing_ids)}")
        self.listing_ids = list(listing_ids)


class ModelMismatchError(IndexInputError):
    """The index holds vectors of another embedding model, or of another revision of it, than the one asked for."""


class IndexConfigError(SearchError, ValueError):
    """Invalid settings for an index (kind, HNSW parameters, table name, database); names the setting."""


class IndexFileError(SearchError, CheckpointError):
    """A saved index cannot be used (missing or unexpected arrays, wrong shapes, checksum mismatch); names the file."""
