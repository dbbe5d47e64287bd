"""The listings an index is built from and answers with, read from the users' ``products`` and ``images`` tables.

Unlike ``data.load_marketplace`` (the classifiers' training view), every product is a listing here, labelled or
not: a listing without a category is still similar to others. What a listing needs depends on what the index
encodes: photos for an image index, a non-empty text for a text index, either for an image + text index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from ..data.database import describe_db_error, mask_url, read_images, read_products
from ..data.schema import images, products
from ..data.text import clean_listing_text
from .base import SearchFilters
from .errors import SearchError

#: Columns of ``read_catalogue``'s frame.
CATALOGUE_COLUMNS = ["listing_id", "name", "category", "price", "location", "text", "image_ids"]
# Ids per ``IN (...)`` list: well under SQLite's 32,766 bound parameters.
_IDS_PER_QUERY = 5_000


@dataclass(frozen=True)
class ListingDetails:
    """What an answer shows of a listing."""

    listing_id: str
    name: str
    category: str | None
    price: float | None
    location: str | None
    image_ids: list[str]


def read_catalogue(engine: Engine) -> pd.DataFrame:
    """Every product as a listing (``CATALOGUE_COLUMNS``), sorted by id: its clean text (name without the site
    suffix + description, as the models read it) and its photo ids, sorted."""
    product_rows = read_products(engine)
    image_rows = read_images(engine)
    # NULL descriptions come back as NaN in a column that has text elsewhere.
    descriptions = product_rows["product_description"].astype(object).where(
        product_rows["product_description"].notna(), None)
    by_product = image_rows.sort_values("id").groupby("product_id", sort=False)["id"].agg(list)
    frame = pd.DataFrame({
        "listing_id": product_rows["id"].astype(str),
        "name": product_rows["product_name"],
        "category": product_rows["category"].astype(object).where(product_rows["category"].notna(), None),
        "price": product_rows["price"],
        "location": product_rows["location"],
        "text": [clean_listing_text(name, description)
                 for name, description in zip(product_rows["product_name"], descriptions)],
    })
    frame["image_ids"] = [by_product.get(listing_id, []) for listing_id in frame["listing_id"]]
    return frame.sort_values("listing_id").reset_index(drop=True)[CATALOGUE_COLUMNS]


def embeddable(catalogue: pd.DataFrame, encodes: str) -> pd.Series:
    """Which listings have what an index of ``encodes`` (``image``, ``text``, ``image+text``) needs."""
    has_photos = catalogue["image_ids"].map(len) > 0
    has_text = catalogue["text"].map(lambda text: bool(text and text.strip()))
    return {"image": has_photos, "text": has_text, "image+text": has_photos | has_text}[encodes]


def _chunks(ids: Sequence[str]) -> list[list[str]]:
    return [list(ids[start:start + _IDS_PER_QUERY]) for start in range(0, len(ids), _IDS_PER_QUERY)]


def listing_details(engine: Engine, listing_ids: Sequence[str]) -> dict[str, ListingDetails]:
    """The name, category, price, location and photo ids of each of ``listing_ids`` found in the database."""
    found: dict[str, ListingDetails] = {}
    photos: dict[str, list[str]] = {listing_id: [] for listing_id in listing_ids}
    try:
        with engine.connect() as conn:
            for chunk in _chunks(list(listing_ids)):
                for row in conn.execute(select(products.c.id, products.c.product_name, products.c.category,
                                               products.c.price, products.c.location)
                                        .where(products.c.id.in_(chunk))):
                    price = None if row.price is None else float(row.price)
                    found[row.id] = ListingDetails(row.id, row.product_name, row.category,
                                                   price if price is None or math.isfinite(price) else None,
                                                   row.location, photos[row.id])
                for image_id, product_id in conn.execute(select(images.c.id, images.c.product_id)
                                                         .where(images.c.product_id.in_(chunk))
                                                         .order_by(images.c.id)):
                    photos[product_id].append(image_id)
    except SQLAlchemyError as exc:
        raise SearchError(f"cannot read listings from database {mask_url(engine.url)}: "
                          f"{describe_db_error(exc)}") from exc
    return found


def allowed_by_filters(engine: Engine, filters: SearchFilters) -> frozenset[str]:
    """The ids of the products that pass ``filters``' category, price and location conditions (what an index
    without the products table, FAISS, takes as ``allowed_ids``); intersected with ``filters.allowed_ids``."""
    conditions = []
    if filters.category is not None:
        # A path prefix at " / " boundaries, as the pgvector backend matches it.
        conditions.append(or_(products.c.category == filters.category,
                              func.substr(products.c.category, 1, len(filters.category) + 3)
                              == filters.category + " / "))
    if filters.min_price is not None:
        conditions.append(products.c.price >= filters.min_price)
    if filters.max_price is not None:
        conditions.append(products.c.price <= filters.max_price)
    if filters.location is not None:
        conditions.append(func.lower(products.c.location).contains(filters.location.lower(), autoescape=True))
    try:
        with engine.connect() as conn:
            ids = frozenset(conn.execute(select(products.c.id).where(and_(*conditions))).scalars())
    except SQLAlchemyError as exc:
        raise SearchError(f"cannot filter listings in database {mask_url(engine.url)}: "
                          f"{describe_db_error(exc)}") from exc
    return ids if filters.allowed_ids is None else ids & filters.allowed_ids
