"""Similar listings as answers: a query vector (or a listing of the index) -> the nearest listings with their
details. The command line (``scripts/search.py``) and the HTTP service (``POST /similar``) both go through here.

A query by listing id takes that listing's stored vector and never answers the listing itself. Filters by category,
price or location are applied by the pgvector backend in SQL; for FAISS they are resolved to an allow-list of
product ids from the products table first. A listing found in the index but gone from the products table (deleted
since the last update) is left out of the answer rather than shown without details.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine

from .base import ListingIndex, SearchFilters
from .catalogue import ListingDetails, allowed_by_filters, listing_details
from .pgvector_index import PgvectorListingIndex


@dataclass(frozen=True)
class SimilarListing:
    """One answer: a listing, its details and its similarity to the query."""

    details: ListingDetails
    score: float


def query_vector_of_listing(index: ListingIndex, listing_id: str) -> np.ndarray:
    """``[1, dim]`` the stored vector of ``listing_id`` (``UnknownListingError`` if the index does not hold it)."""
    return index.get_vectors([listing_id])


def index_filters(index: ListingIndex, engine: Engine, filters: SearchFilters | None) -> SearchFilters | None:
    """``filters`` as ``index`` can apply them: unchanged for pgvector, resolved to ``allowed_ids`` for FAISS."""
    if filters is None or isinstance(index, PgvectorListingIndex) or not filters.database_filters:
        return filters
    return SearchFilters(allowed_ids=allowed_by_filters(engine, filters))


def similar_listings(index: ListingIndex, engine: Engine, query: np.ndarray, k: int, *,
                     exclude_ids: frozenset[str] = frozenset(),
                     filters: SearchFilters | None = None) -> list[SimilarListing]:
    """The ``k`` listings most similar to the unit vector ``query`` (``[dim]`` or ``[1, dim]``), best first, each
    once, none of ``exclude_ids``, with their details from the products table."""
    found = index.search(np.atleast_2d(query), k, exclude_ids=[exclude_ids],
                         filters=index_filters(index, engine, filters))[0]
    details = listing_details(engine, [neighbour.listing_id for neighbour in found])
    return [SimilarListing(details[neighbour.listing_id], neighbour.score)
            for neighbour in found if neighbour.listing_id in details]
