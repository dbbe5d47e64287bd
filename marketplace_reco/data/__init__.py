"""The data layer: the users' database and photo bucket in, clean labelled products and photos out.

    >>> from marketplace_reco.data import load_marketplace
    >>> marketplace = load_marketplace("sqlite:///data/marketplace.db", "data/images")
    >>> splits = marketplace.split((0.8, 0.1, 0.1), seed=0)      # by product, stratified

See docs/ARCHITECTURE.md for the modules and the ``Marketplace`` contract.
"""

from .database import open_engine
from .dataset import Marketplace, load_marketplace, root_category
from .errors import (
    CorruptImageError,
    DatabaseError,
    DataConfigError,
    DataError,
    ImageNotFoundError,
    ImageStoreError,
    ImageStoreUnreachableError,
    ImageTooLargeError,
    ImportFileError,
)
from .image_store import ImageStore, LocalImageStore, S3ImageStore, copy_images, open_image_store
from .images import letterbox, load_image
from .importer import ImportReport, import_csv
from .sample import make_sample_marketplace
from .schema import create_schema
from .splits import split_by_product
from .text import TextPreprocessor, clean_listing_text

__all__ = [
    "CorruptImageError",
    "DataConfigError",
    "DataError",
    "DatabaseError",
    "ImageNotFoundError",
    "ImageStore",
    "ImageStoreError",
    "ImageStoreUnreachableError",
    "ImageTooLargeError",
    "ImportFileError",
    "ImportReport",
    "LocalImageStore",
    "Marketplace",
    "S3ImageStore",
    "TextPreprocessor",
    "clean_listing_text",
    "copy_images",
    "create_schema",
    "import_csv",
    "letterbox",
    "load_image",
    "load_marketplace",
    "make_sample_marketplace",
    "open_engine",
    "open_image_store",
    "root_category",
    "split_by_product",
]
