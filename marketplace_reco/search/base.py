"""What every listing index shares: the interface, the search results and filters, and the input checks.

Items are listings (product ids), one L2-normalised float32 vector each; the metric is the inner product, which
for unit vectors is the cosine similarity, so a score is in [-1, 1] and higher is more similar. Every mutating
call is all or nothing: a bad id or vector anywhere in it raises before anything changes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.schema import products
from .errors import DuplicateListingError, IndexConfigError, IndexInputError, ModelMismatchError

#: The largest ``k`` a search accepts: more neighbours than a page of results is a scan, not a search.
MAX_K = 1000
#: The similarity every index computes (between unit vectors: the cosine).
METRIC = "inner_product"
#: What an index's vectors may encode.
ENCODES = ("image", "text", "image+text")
#: A listing id is a product id: as long as the products table allows.
MAX_ID_LENGTH: int = products.c.id.type.length
# |norm - 1| allowed for a "unit" vector: float32 rounding leaves about 1e-7, a forgotten normalisation far more.
_NORM_TOLERANCE = 1e-3
# How many offending rows a message lists.
_SHOWN_ROWS = 10


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which model made an index's vectors, what they encode and their dimension."""

    model_name: str
    model_revision: str
    model_type: str
    encodes: str
    dim: int

    def __post_init__(self) -> None:
        for field_name in ("model_name", "model_revision", "model_type"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value.strip():
                raise IndexConfigError(f"embedding {field_name} must be a non-empty string, got {value!r}")
        if self.encodes not in ENCODES:
            raise IndexConfigError(f"embedding encodes must be one of {ENCODES}, got {self.encodes!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise IndexConfigError(f"embedding dim must be a positive integer, got {self.dim!r}")

    def to_config(self) -> dict[str, Any]:
        """The JSON form kept with an index (the embedding model as {name, revision, model_type})."""
        return {
            "embedding_model": {"name": self.model_name, "revision": self.model_revision,
                                "model_type": self.model_type},
            "encodes": self.encodes,
            "dim": self.dim,
            "metric": METRIC,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> EmbeddingSpec:
        """Read ``to_config()``'s form back; ``where`` names the source in error messages."""
        try:
            model = config["embedding_model"]
            spec = cls(model_name=model["name"], model_revision=model["revision"], model_type=model["model_type"],
                       encodes=config["encodes"], dim=config["dim"])
        except (KeyError, TypeError) as exc:
            raise IndexConfigError(f"{where}: incomplete embedding description (missing {exc})") from None
        if config.get("metric") != METRIC:
            raise IndexConfigError(f"{where}: metric {config.get('metric')!r}; this version searches by {METRIC!r}")
        return spec


@dataclass(frozen=True)
class Neighbour:
    """One search result: a listing and its similarity to the query (inner product of unit vectors)."""

    listing_id: str
    score: float


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions on which listings a search may return; every one set must hold.

    ``category`` is a category path prefix matched at `` / `` boundaries (``Home & Garden`` matches every listing
    under that root, ``Home & Garden / Mirrors`` only that branch); ``min_price``/``max_price`` bound the price in
    pounds, inclusive (listings without a price are left out when either is set); ``location`` is a
    case-insensitive substring of the listing's location; ``allowed_ids`` is an allow-list of listing ids (ids the
    index does not hold are ignored). Only the pgvector backend, which sits beside the products table, filters by
    category, price and location; the FAISS backend takes the allow-list, which the caller resolves from the
    database.
    """

    category: str | None = None
    min_price: float | None = None
    max_price: float | None = None
    location: str | None = None
    allowed_ids: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for field_name in ("category", "location"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise IndexInputError(f"filter {field_name} must be a non-empty string, got {value!r}")
        for field_name in ("min_price", "max_price"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value < 0):
                raise IndexInputError(f"filter {field_name} must be a finite number >= 0, got {value!r}")
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise IndexInputError(f"filter min_price {self.min_price} is above max_price {self.max_price}")
        if self.allowed_ids is not None:
            if isinstance(self.allowed_ids, str):
                raise IndexInputError("filter allowed_ids must be a collection of listing ids, not one string")
            object.__setattr__(self, "allowed_ids", frozenset(self.allowed_ids))

    @property
    def database_filters(self) -> list[str]:
        """The names of the filters set that need the products table (category, price, location)."""
        return [name for name in ("category", "min_price", "max_price", "location") if getattr(self, name) is not None]


class ListingIndex(ABC):
    """Vectors of listings, searchable by similarity; the FAISS and pgvector backends implement it alike."""

    embedding: EmbeddingSpec

    @abstractmethod
    def __len__(self) -> int:
        """How many listings the index holds."""

    @abstractmethod
    def __contains__(self, listing_id: object) -> bool:
        """Whether the index holds a vector for ``listing_id``."""

    @abstractmethod
    def listing_ids(self) -> list[str]:
        """Every listing id the index holds (what an incremental update compares with the database)."""

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add new listings; an id the index holds already is an error (use ``upsert`` to replace it)."""
        ids = _check_ids(ids)
        self._write(ids, _check_vectors(vectors, self.embedding.dim, "vectors", len(ids)), replace=False)

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Replace the vectors of listings the index holds and add the others."""
        ids = _check_ids(ids)
        self._write(ids, _check_vectors(vectors, self.embedding.dim, "vectors", len(ids)), replace=True)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove listings; an id the index does not hold is an error (``UnknownListingError``), nothing removed."""
        self._delete(_check_ids(ids))

    def get_vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids``, ``[len(ids), dim]`` float32 in the order given."""
        return self._get_vectors(_check_ids(ids))

    def search(self, query_vectors: np.ndarray, k: int, *, exclude_ids: Sequence[Iterable[str]] | None = None,
               filters: SearchFilters | None = None) -> list[list[Neighbour]]:
        """The ``k`` most similar listings to each query vector, best first.

        ``query_vectors`` is ``[n, dim]`` (unit vectors); ``exclude_ids``, when given, holds one collection of
        listing ids per query that its results must leave out (typically the query's own listing); ``filters``
        apply to every query of the call (queries with different filters go in separate calls). Fewer than ``k``
        results come back only when fewer than ``k`` listings pass the filters and exclusions.
        """
        queries = _check_vectors(query_vectors, self.embedding.dim, "query_vectors")
        if queries.shape[0] == 0:
            raise IndexInputError("query_vectors is empty: give at least one query vector")
        return self._search(queries, _check_k(k), _check_exclusions(exclude_ids, len(queries)), filters)

    # ---- what a backend implements, on checked arguments -----------------------------------------------------
    @abstractmethod
    def _write(self, ids: list[str], vectors: np.ndarray, *, replace: bool) -> None:
        """Add (``replace=False``: refuse ids present) or upsert checked rows, all or nothing."""

    @abstractmethod
    def _delete(self, ids: list[str]) -> None:
        """Delete checked ids, all or nothing."""

    @abstractmethod
    def _get_vectors(self, ids: list[str]) -> np.ndarray:
        """The vectors of checked ids."""

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, exclusions: list[frozenset[str]],
                filters: SearchFilters | None) -> list[list[Neighbour]]:
        """Search with checked queries, ``k`` and one exclusion set per query."""

    def check_model(self, model_name: str, model_revision: str) -> None:
        """Raise ``ModelMismatchError`` unless the index was built by ``model_name`` at ``model_revision``."""
        built = self.embedding
        if (built.model_name, built.model_revision) != (model_name, model_revision):
            raise ModelMismatchError(
                f"the index holds vectors of model {built.model_name!r} revision {built.model_revision!r}, "
                f"not of {model_name!r} revision {model_revision!r}: rebuild the index with that model, "
                "or query with the model that built it"
            )


# ---- input checks, the same for every backend ---------------------------------------------------------------------
def _check_ids(ids: Sequence[str], what: str = "ids") -> list[str]:
    """``ids`` as a list, checked: a sequence of non-empty strings of at most ``MAX_ID_LENGTH``, none twice."""
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray):
        raise IndexInputError(f"{what} must be a sequence of listing ids, got {type(ids).__name__}")
    checked = list(ids)
    for position, listing_id in enumerate(checked):
        if not isinstance(listing_id, str) or not listing_id or len(listing_id) > MAX_ID_LENGTH:
            raise IndexInputError(f"{what}[{position}] must be a non-empty string of at most {MAX_ID_LENGTH} "
                                  f"characters, got {listing_id!r}")
    repeated = [listing_id for listing_id, count in Counter(checked).items() if count > 1]
    if repeated:
        raise DuplicateListingError(repeated, f"appear more than once in {what}")
    return checked


def _check_vectors(vectors: Any, dim: int, what: str, n_rows: int | None = None) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``[n, dim]`` array, checked: finite and of unit length (L2).

    ``n_rows``, when given, is the number of rows required (one per id).
    """
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise IndexInputError(f"{what} must be a [n, {dim}] array of numbers ({exc})") from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise IndexInputError(f"{what} must have shape [n, {dim}] (the index's dimension), got {list(array.shape)}")
    if n_rows is not None and array.shape[0] != n_rows:
        raise IndexInputError(f"{what} has {array.shape[0]} rows for {n_rows} listing ids")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise IndexInputError(f"{what}: rows {_rows(~finite)} hold NaN or infinite values")
    norms = np.linalg.norm(array, axis=1)
    off_unit = np.abs(norms - 1.0) > _NORM_TOLERANCE
    if off_unit.any():
        first = int(np.flatnonzero(off_unit)[0])
        raise IndexInputError(f"{what}: rows {_rows(off_unit)} are not L2-normalised (row {first} has norm "
                              f"{norms[first]:.4g}); normalise the vectors before indexing or searching")
    return np.ascontiguousarray(array)


def _check_k(k: Any) -> int:
    """``k`` checked: an integer from 1 to ``MAX_K``."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise IndexInputError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    return int(k)


def _check_exclusions(exclude_ids: Sequence[Iterable[str]] | None, n_queries: int) -> list[frozenset[str]]:
    """One set of excluded listing ids per query (empty sets when ``exclude_ids`` is None)."""
    if exclude_ids is None:
        return [frozenset()] * n_queries
    if isinstance(exclude_ids, str) or len(exclude_ids) != n_queries:
        raise IndexInputError(f"exclude_ids must hold one collection of listing ids per query ({n_queries}), "
                              f"got {exclude_ids!r:.100}")
    exclusions = []
    for position, excluded in enumerate(exclude_ids):
        if isinstance(excluded, str):
            raise IndexInputError(f"exclude_ids[{position}] must be a collection of listing ids, not the string "
                                  f"{excluded!r} (write [{excluded!r}])")
        exclusions.append(frozenset(excluded))
    return exclusions


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(row) for row in rows[:_SHOWN_ROWS])
    return shown + (f" and {len(rows) - _SHOWN_ROWS} more" if len(rows) > _SHOWN_ROWS else "")
