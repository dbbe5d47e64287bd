"""Train/validation/test splits by product, stratified on the label, deterministic.

Splitting products (not images) keeps every photo of a product in one split, so a model is never
tested on another photo of a listing it was trained on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Sequence

import numpy as np
import pandas as pd

from .errors import DataConfigError, DataError

SPLIT_NAMES = ("train", "val", "test")
_TOLERANCE = 1e-6


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative fractions summing to 1, with a non-empty training share."""
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLIT_NAMES):
        raise DataConfigError(f"split fractions must be three numbers (train, val, test), got {fractions!r}")
    if any(not math.isfinite(f) or f < 0 for f in values) or values[0] <= 0:
        raise DataConfigError(f"split fractions must be non-negative with train > 0, got {fractions!r}")
    if abs(sum(values) - 1.0) > _TOLERANCE:
        raise DataConfigError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def _class_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """How many of a class's ``n`` products go to each split.

    Largest-remainder rounding of ``n * fraction``; then, when the class has at least one product per
    non-empty split, every such split gets at least one (taken from the largest), so small classes
    still appear in validation and test.
    """
    exact = [n * f for f in fractions]
    counts = [math.floor(x) for x in exact]
    # Ties go to the earlier split (train first): sorted() is stable.
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
                counts[i] = 1
    return counts


def _class_seed(seed: int, label: Hashable) -> list[int]:
    """A per-class seed, so adding products of one class never reshuffles another class."""
    return [seed, zlib.crc32(str(label).encode("utf-8"))]


def split_by_product(
    labels: pd.Series, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[Hashable]]:
    """Product ids per split (``train``, ``val``, ``test``), stratified on ``labels``.

    ``labels`` is indexed by product id (one row per product). The result depends only on the set of
    (id, label) pairs, ``fractions`` and ``seed``, never on row order; each list is sorted.
    Raises ``DataConfigError`` for bad fractions and ``DataError`` for duplicate ids or missing labels.
    """
    values = _check_fractions(fractions)
    if labels.index.has_duplicates:
        duplicated = labels.index[labels.index.duplicated()].unique()[:5].tolist()
        raise DataError(f"split_by_product: duplicate product ids {duplicated}; pass one label per product")
    if labels.isna().any():
        unlabelled = labels.index[labels.isna()][:5].tolist()
        raise DataError(f"split_by_product: products {unlabelled} have no label; leave them out before splitting")
    ordered = labels.sort_index()
    splits: dict[str, list[Hashable]] = {name: [] for name in SPLIT_NAMES}
    for label, group in ordered.groupby(ordered, sort=True):
        ids = group.index.to_numpy()
        shuffled = ids[np.random.default_rng(_class_seed(seed, label)).permutation(len(ids))]
        start = 0
        for name, count in zip(SPLIT_NAMES, _class_counts(len(ids), values)):
            splits[name].extend(shuffled[start : start + count].tolist())
            start += count
    return {name: sorted(ids) for name, ids in splits.items()}
