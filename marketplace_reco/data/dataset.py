"""The marketplace as the models see it: one row per usable product, its clean text, label and photos.

``load_marketplace()`` reads both tables, cleans the text (``text.clean_listing_text``), takes the
label as the root of the category path (text before the first ``/``) and leaves out, with a logged
warning and an entry in ``summary()``, products that have no label or no text. Products without
photos are kept (text models use them); they simply have an empty ``image_ids`` list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from .database import mask_url, open_engine, read_images, read_products
from .errors import DataError
from .image_store import ImageStore, open_image_store
from .images import load_image
from .splits import split_by_product
from .text import clean_listing_text

logger = logging.getLogger(__name__)

PRODUCT_COLUMNS = ["product_id", "text", "label", "image_ids"]
NO_LABEL = "no label"
NO_TEXT = "no text"


def root_category(category: str | None) -> str | None:
    """``"Home & Garden / Dining / Mirrors"`` -> ``"Home & Garden"``; None for an empty category."""
    if category is None or pd.isna(category):
        return None
    root = str(category).split("/", 1)[0].strip()
    return root or None


@dataclass
class Marketplace:
    """Usable products (columns ``product_id, text, label, image_ids``) with their classes and photo store.

    ``classes`` is the sorted list of labels of the loaded marketplace; subsets and splits keep it,
    so class indices mean the same everywhere. ``excluded`` lists products left out (``product_id, reason``).
    """

    products: pd.DataFrame
    classes: list[str]
    image_store: ImageStore
    excluded: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["product_id", "reason"]))
    source: dict[str, str] = field(default_factory=dict)

    @property
    def label_indices(self) -> np.ndarray:
        """Index of each product's label in ``classes`` (int64, aligned with ``products``)."""
        return pd.Categorical(self.products["label"], categories=self.classes).codes.astype(np.int64)

    def images_frame(self) -> pd.DataFrame:
        """One row per photo: ``image_id, product_id, label`` (products without photos have no row)."""
        exploded = self.products[["product_id", "label", "image_ids"]].explode("image_ids").dropna(subset=["image_ids"])
        frame = exploded.rename(columns={"image_ids": "image_id"})[["image_id", "product_id", "label"]]
        return frame.reset_index(drop=True)

    def product_texts(self, product_ids: Iterable[Any]) -> list[str]:
        """The clean text of each of ``product_ids`` (repeats allowed, e.g. one per photo), in that order."""
        return self.products.set_index("product_id").loc[list(product_ids), "text"].tolist()

    def subset(self, product_ids: Iterable[Any]) -> Marketplace:
        """The products with these ids (in ``products`` order), same classes and store, nothing excluded."""
        wanted = pd.Index(list(product_ids))
        unknown = wanted.difference(self.products["product_id"])
        if len(unknown):
            raise DataError(f"subset: {len(unknown)} product id(s) not in this marketplace, "
                            f"e.g. {unknown[:3].tolist()}")
        rows = self.products[self.products["product_id"].isin(wanted)].reset_index(drop=True)
        return Marketplace(rows, list(self.classes), self.image_store, source=dict(self.source))

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, Marketplace]:
        """``train``/``val``/``test`` marketplaces, by product and stratified on the label (``split_by_product``)."""
        labels = self.products.set_index("product_id")["label"]
        return {name: self.subset(ids) for name, ids in split_by_product(labels, fractions, seed).items()}

    def load_images(self, image_ids: Sequence[str], max_workers: int = 8) -> list[Image.Image]:
        """Decoded RGB photos (``images.load_image``) for ``image_ids``, fetched concurrently, in order."""
        encoded = self.image_store.get_many(image_ids, max_workers=max_workers)
        return [load_image(encoded[image_id], name=f"{image_id} from {self.image_store.location}")
                for image_id in image_ids]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description for model cards and reports."""
        n_images = self.products["image_ids"].map(len)
        counts = self.products["label"].value_counts()
        return {
            "products": len(self.products),
            "images": int(n_images.sum()),
            "products_without_images": int((n_images == 0).sum()),
            "classes": {name: int(counts.get(name, 0)) for name in self.classes},
            "excluded": {
                "products": len(self.excluded),
                "reasons": {str(k): int(v) for k, v in self.excluded["reason"].value_counts().sort_index().items()},
            },
            "source": dict(self.source),
        }


def load_marketplace(db_url: str | None = None, image_location: str | None = None) -> Marketplace:
    """Read the marketplace from ``db_url`` with photos at ``image_location`` (None: defaults from settings)."""
    engine = open_engine(db_url)
    try:
        products = read_products(engine)
        images = read_images(engine)
    finally:
        engine.dispose()
    store = open_image_store(image_location)
    source = {"database": mask_url(engine.url), "images": store.location}

    frame = pd.DataFrame({
        "product_id": products["id"].astype(str),
        "text": [clean_listing_text(name, description)
                 for name, description in zip(products["product_name"], products["product_description"])],
        "label": products["category"].map(root_category),
    })
    reasons = np.where(frame["label"].isna(), NO_LABEL, np.where(frame["text"] == "", NO_TEXT, ""))
    excluded = pd.DataFrame({"product_id": frame["product_id"][reasons != ""], "reason": reasons[reasons != ""]})
    if len(excluded):
        counts = ", ".join(f"{n} {reason}" for reason, n in excluded["reason"].value_counts().sort_index().items())
        logger.warning("%s: %d product(s) left out (%s); see Marketplace.summary()['excluded']",
                       source["database"], len(excluded), counts)
    frame = frame[reasons == ""].reset_index(drop=True)
    if frame.empty:
        raise DataError(f"database {source['database']} has no usable product (with a label and text)")

    # Sorted here rather than by the database, whose collation (e.g. PostgreSQL's locale) may order ids
    # differently: the same data gives the same rows and photo lists whatever the backend.
    by_product = images.sort_values("id").groupby("product_id", sort=False)["id"].agg(list)
    frame["image_ids"] = [by_product.get(pid, []) for pid in frame["product_id"]]
    frame = frame.sort_values("product_id").reset_index(drop=True)[PRODUCT_COLUMNS]
    return Marketplace(frame, sorted(frame["label"].unique()), store,
                       excluded.reset_index(drop=True), source)
