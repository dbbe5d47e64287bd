"""Listings with several photos: a listing's photos are scored one by one and count together, the same way in
evaluation, in the fusion model and in serving; and what every model's ``embed`` shares (listing vectors)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from .errors import ModelConfigError

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


def l2_normalize_rows(rows: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm; a row of zeros stays zeros (it has no direction, and a listing index
    refuses it by name rather than store a vector that is similar to nothing)."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def listing_photo_embeddings(images: Sequence[ListingImages], photo_features: Callable[[list[Image.Image]], np.ndarray],
                             who: str) -> np.ndarray:
    """[n_listings, width] unit vectors: each listing's photos' features (``photo_features``) averaged, then
    normalised. Every listing needs at least one photo; ``who`` names the model in the error."""
    if len(images) == 0:
        raise ModelConfigError(f"{who}.embed needs images=[...] (a photo or a list of photos each)")
    photos, owners = listing_groups(images)
    counts = np.bincount(owners, minlength=len(images))
    if not counts.all():
        raise ModelConfigError(f"{who}.embed needs at least one photo per listing; listing "
                               f"{int(np.flatnonzero(counts == 0)[0])} has none")
    return l2_normalize_rows(mean_by_listing(photo_features(photos), owners, len(images)))
