"""Photos as training data: per-split photo tables, decoding in chunks, batched augmentation, batch datasets.

Image models learn and predict per photo; a product's prediction is the mean of its photos' probabilities,
so image and fusion models are evaluated per product, like the text model (``SplitImages.evaluate``).

Datasets here hand out whole batches (``dataset[list of indices]``, see ``batch_loader``): one feature-cache
lookup or one augmentation call per batch instead of per photo. Augmentation (``augment_batch``: random
resized crop, horizontal flip, brightness/contrast/saturation jitter, the geometry in one ``grid_sample``)
works on tensors of a whole batch, far cheaper on a CPU than per-photo PIL transforms.

Views: a photo seen a given way, by name (``render_view``): ``plain``, ``mirror`` (the model's prediction views)
or an augmented view ``augmented<k>-seed<s>`` (``augmented_view_names``) whose random crop, flip and jitter
depend only on the photo's id, ``k`` and ``s``, so a view is the same whichever batch or process renders it. A
feature cache stores a view's arrays under ``view_key(image id, view)``; ``RandomViewBatches`` hands each photo
out in one of its cached views, drawn afresh every time.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .._progress import progress_bar
from ..data.dataset import Marketplace
from ..data.errors import DataError
from ..data.image_store import ImageStore
from ..data.images import load_image
from ..models.image_classifier import PREDICTION_VIEWS
from .feature_cache import FeatureCache
from .metrics import evaluate

# Photos fetched and decoded per chunk.
IMAGE_CHUNK = 128
# Augmentation ranges: crop area fraction, crop aspect ratio, colour jitter strength.
_CROP_SCALE = (0.5, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_JITTER = 0.2
#: Random numbers one augmentation draws per photo: crop area, aspect, flip, x and y offset, 3 jitters.
_DRAWS = 8
_AUGMENTED_VIEW = re.compile(r"augmented(\d+)-seed(-?\d+)")


@dataclass
class SplitImages:
    """The photos of one split (one row per photo: id, product, label) and its products with photos."""

    image_ids: list[str]
    image_products: np.ndarray
    image_labels: np.ndarray
    product_ids: np.ndarray
    product_labels: np.ndarray

    @classmethod
    def from_split(cls, split: Marketplace, name: str) -> SplitImages:
        frame = split.images_frame()
        if frame.empty:
            raise DataError(f"the {name} split has no photos: an image model cannot be trained or evaluated on it")
        products = frame.drop_duplicates("product_id")
        return cls(
            image_ids=frame["image_id"].tolist(),
            image_products=frame["product_id"].to_numpy(),
            image_labels=pd.Categorical(frame["label"], categories=split.classes).codes.astype(np.int64),
            product_ids=products["product_id"].to_numpy(),
            product_labels=pd.Categorical(products["label"], categories=split.classes).codes.astype(np.int64),
        )

    def shard(self, rank: int, world_size: int, *, pad: bool) -> SplitImages:
        """Photos ``rank, rank + world_size, ...``: this rank's fixed share of the split.

        A fixed share (rather than a new one each epoch) means each rank computes and caches the frozen
        features of its own photos only. ``pad=True`` (training) repeats photos from the start so that every
        rank has the same number of batches, which DDP's gradient averaging needs; ``pad=False``
        (evaluation) is an exact partition, so metrics summed over ranks count each photo once.
        """
        total = -(-len(self.image_ids) // world_size) * world_size if pad else len(self.image_ids)
        keep = np.arange(rank, total, world_size) % len(self.image_ids)
        return SplitImages([self.image_ids[i] for i in keep], self.image_products[keep], self.image_labels[keep],
                           self.product_ids, self.product_labels)

    def product_proba(self, image_proba: np.ndarray) -> np.ndarray:
        """Average the photos' probabilities per product, rows in ``product_ids`` order."""
        frame = pd.DataFrame(image_proba).groupby(self.image_products, sort=False).mean()
        return frame.loc[self.product_ids].to_numpy()

    def evaluate(self, image_proba: np.ndarray, classes: Sequence[str], name: str) -> dict[str, Any]:
        """``metrics.evaluate`` per product (photos' probabilities averaged), per-photo figures under ``per_image``."""
        metrics = evaluate(self.product_labels, self.product_proba(image_proba), classes, split=name)
        per_image = evaluate(self.image_labels, image_proba, classes, split=name)
        metrics["unit"] = "products"
        metrics["per_image"] = {key: per_image[key] for key in ("n_samples", "accuracy", "macro_f1", "ece")}
        return metrics


def image_chunks(store: ImageStore, image_ids: Sequence[str], *, desc: str | None) -> Iterator[list[Image.Image]]:
    """Decoded RGB photos, ``IMAGE_CHUNK`` at a time, in ``image_ids`` order (with a progress bar unless
    ``desc`` is None)."""
    with ThreadPoolExecutor(max_workers=4) as pool, \
            progress_bar(total=len(image_ids), desc=desc, unit="img", disable=desc is None) as progress:
        for start in range(0, len(image_ids), IMAGE_CHUNK):
            ids = list(image_ids[start:start + IMAGE_CHUNK])
            encoded = store.get_many(ids)
            # JPEG decoding releases the GIL, so threads use every core.
            yield list(pool.map(lambda i, chunk=encoded: load_image(chunk[i], name=f"{i} from {store.location}"), ids))
            progress.update(len(ids))


def load_pixels(store: ImageStore, image_ids: Sequence[str], to_pixels: Callable[[Sequence[Image.Image]], torch.Tensor],
                *, desc: str | None = "decode photos") -> torch.Tensor:
    """Photos as one uint8 tensor [n, 3, size, size]; ``to_pixels`` is the model's letterboxing."""
    return torch.cat([to_pixels(images) for images in image_chunks(store, image_ids, desc=desc)])


def augment_batch(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop + horizontal flip + colour jitter of a uint8 batch [n, 3, h, w] -> float in [0, 1]."""
    return _augment(pixels, torch.rand(pixels.shape[0], _DRAWS, generator=generator))


def _augment(pixels: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """``augment_batch`` with its random numbers given: ``draws`` [n, _DRAWS] uniform in [0, 1)."""
    n = pixels.shape[0]
    x = pixels.float() / 255.0

    def scaled(column: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * draws[:, column]

    area = scaled(0, *_CROP_SCALE)
    aspect = torch.exp(scaled(1, float(np.log(_CROP_RATIO[0])), float(np.log(_CROP_RATIO[1]))))
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # crop sides as fractions of the photo's
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    flip = torch.where(draws[:, 2] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 1, 1] = height
    theta[:, 0, 2] = scaled(3, -1.0, 1.0) * (1 - width)
    theta[:, 1, 2] = scaled(4, -1.0, 1.0) * (1 - height)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    brightness, contrast, saturation = (scaled(column, 1 - _JITTER, 1 + _JITTER).view(n, 1, 1, 1)
                                        for column in (5, 6, 7))
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = grey + (x - grey) * saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * contrast
    return (x * brightness).clamp(0.0, 1.0)


# ---- views ---------------------------------------------------------------------------------------------------
def augmented_view_names(count: int, seed: int) -> list[str]:
    """The names of ``count`` augmented views drawn with ``seed``."""
    return [f"augmented{k}-seed{seed}" for k in range(1, count + 1)]


def view_key(image_id: str, view: str) -> str:
    """A feature cache's key for ``view`` of a photo: its id for the plain view (shared with every user of plain
    trunk outputs), else ``<id>~<view>`` ("~" never occurs in an image id)."""
    return image_id if view == "plain" else f"{image_id}~{view}"


def parse_view_key(key: str) -> tuple[str, str]:
    """``(image id, view)`` of a ``view_key``."""
    image_id, _, view = key.partition("~")
    return image_id, view or "plain"


def render_view(pixels: torch.Tensor, image_ids: Sequence[str], view: str) -> torch.Tensor:
    """The photos ``pixels`` (uint8 [n, 3, h, w], of ``image_ids``) seen as ``view``, as floats in [0, 1]."""
    if view in PREDICTION_VIEWS:
        return PREDICTION_VIEWS[view](pixels).float() / 255.0
    if _AUGMENTED_VIEW.fullmatch(view) is None:
        raise ValueError(f"unknown view {view!r}: expected one of {list(PREDICTION_VIEWS)} or 'augmented<k>-seed<s>'")
    draws = torch.stack([torch.rand(_DRAWS, generator=torch.Generator().manual_seed(_view_seed(image_id, view)))
                         for image_id in image_ids])
    return _augment(pixels, draws)


def _view_seed(image_id: str, view: str) -> int:
    """A seed that depends on the photo and the view only (not on the process: Python's hash() would)."""
    return int.from_bytes(hashlib.sha256(f"{view}/{image_id}".encode()).digest()[:8], "little") >> 1


class ImageBatches(Dataset):
    """Batches of normalised photos from uint8 pixels in memory, augmented afresh each time if asked."""

    def __init__(self, pixels: torch.Tensor, labels: np.ndarray, normalize: Callable[[torch.Tensor], torch.Tensor],
                 *, augment: bool, seed: int = 0) -> None:
        self.pixels = pixels
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.normalize = normalize
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.pixels[indices]
        return self.normalize(augment_batch(batch, self.generator) if self.augment else batch), self.labels[indices]


class CachedBatches(Dataset):
    """Batches of cached feature arrays: each part is ``(fingerprint, key of each item)`` in ``cache``.

    A batch's inputs are every part's arrays (as float32 tensors) followed by ``extra`` tensors indexed per
    item (e.g. token ids of a branch that is not cached), in that order.
    """

    def __init__(self, cache: FeatureCache, parts: Sequence[tuple[str, Sequence[str]]], labels: np.ndarray,
                 extra: Sequence[torch.Tensor] = ()) -> None:
        self.cache = cache
        self.parts = [(fingerprint, list(keys)) for fingerprint, keys in parts]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.extra = list(extra)
        for fingerprint, keys in self.parts:
            absent = cache.missing(fingerprint, keys)
            if absent:
                raise DataError(f"feature cache lacks {len(absent)} item(s) of {fingerprint!r}, e.g. {absent[:3]}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        inputs: list[torch.Tensor] = []
        for fingerprint, keys in self.parts:
            arrays = self.cache.get(fingerprint, [keys[i] for i in indices])
            inputs.extend(torch.from_numpy(array).float() for array in arrays)
        inputs.extend(tensor[indices] for tensor in self.extra)
        return tuple(inputs), self.labels[indices]


class RandomViewBatches(CachedBatches):
    """Batches of cached feature arrays where each item comes in one of several views, drawn at random each time.

    ``views[v][i]`` is the cache key of item ``i`` in view ``v`` (all under ``fingerprint``); a batch draws one
    view per item, uniformly, from a generator seeded with ``seed``, so a run is reproducible.
    """

    def __init__(self, cache: FeatureCache, fingerprint: str, views: Sequence[Sequence[str]], labels: np.ndarray,
                 *, seed: int = 0) -> None:
        super().__init__(cache, [(fingerprint, keys) for keys in views], labels)
        self.generator = torch.Generator().manual_seed(seed)

    def __getitem__(self, indices: list[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        drawn = torch.randint(len(self.parts), (len(indices),), generator=self.generator).numpy()
        outputs: list[np.ndarray] = []
        for view in np.unique(drawn):
            rows = np.flatnonzero(drawn == view)
            fingerprint, keys = self.parts[view]
            arrays = self.cache.get(fingerprint, [keys[indices[row]] for row in rows])
            if not outputs:
                outputs = [np.empty((len(indices), *array.shape[1:]), dtype=array.dtype) for array in arrays]
            for output, array in zip(outputs, arrays):
                output[rows] = array
        return tuple(torch.from_numpy(output).float() for output in outputs), self.labels[indices]


def batch_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                 drop_last: bool = False) -> DataLoader:
    """A loader that asks ``dataset`` for whole batches (``dataset[indices]``); shuffled anew each epoch if asked,
    the last incomplete batch dropped if asked."""
    order = (RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle  # type: ignore[arg-type]
             else SequentialSampler(dataset))  # type: ignore[arg-type]
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=drop_last), batch_size=None)
