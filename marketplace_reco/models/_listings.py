"""Listings with several photos: a listing's photos are scored one by one and count together, the same way in
evaluation, in the fusion model and in serving."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

#: What a listing's photos may be: one photo, several, or none.
ListingImages = Image.Image | Sequence[Image.Image] | None


def listing_groups(images: Sequence[ListingImages]) -> tuple[list[Image.Image], np.ndarray]:
    """Every photo of the listings in one list, and each photo's listing index."""
    photos: list[Image.Image] = []
    owners: list[int] = []
    for index, item in enumerate(images):
        own = [] if item is None else [item] if isinstance(item, Image.Image) else list(item)
        photos += own
        owners += [index] * len(own)
    return photos, np.asarray(owners, dtype=np.int64)


def mean_by_listing(rows: np.ndarray, owners: np.ndarray, n_listings: int) -> np.ndarray:
    """[n_listings, width] the mean of each listing's rows (zeros for a listing without any)."""
    sums = np.zeros((n_listings, rows.shape[1]), dtype=np.float64)
    np.add.at(sums, owners, rows)
    counts = np.bincount(owners, minlength=n_listings)[:, None]
    return sums / np.maximum(counts, 1)
