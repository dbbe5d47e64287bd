"""Similar-listing search: listing vectors in an index, searched by inner product (cosine of unit vectors).

Two backends behind one interface (``ListingIndex``): ``FaissListingIndex`` in process (exact, or HNSW above a
measured size), saved and loaded like a model checkpoint; ``PgvectorListingIndex`` in PostgreSQL with pgvector,
beside the products table, filterable by category, price and location in SQL.
"""

from .base import MAX_K, EmbeddingSpec, ListingIndex, Neighbour, SearchFilters
from .errors import (
    DuplicateListingError,
    IndexConfigError,
    IndexFileError,
    IndexInputError,
    ModelMismatchError,
    SearchError,
    UnknownListingError,
)
from .faiss_index import FaissListingIndex

__all__ = [
    "MAX_K",
    "DuplicateListingError",
    "EmbeddingSpec",
    "FaissListingIndex",
    "IndexConfigError",
    "IndexFileError",
    "IndexInputError",
    "ListingIndex",
    "ModelMismatchError",
    "Neighbour",
    "SearchError",
    "SearchFilters",
    "UnknownListingError",
]
