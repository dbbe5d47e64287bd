"""Marketplaces of texts only, built in memory, for tests of the text models' training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from marketplace_reco.data import LocalImageStore, Marketplace


def text_marketplace(texts: Sequence[str], labels: Sequence[int], classes: Sequence[str],
                     prefix: str = "p") -> Marketplace:
    """Products ``<prefix>0000``, ... with these texts and label indices, no photos (the photo folder is empty)."""
    products = pd.DataFrame({
        "product_id": [f"{prefix}{i:04d}" for i in range(len(texts))],
        "text": list(texts),
        "label": [classes[int(label)] for label in np.asarray(labels)],
        "image_ids": [[] for _ in texts],
    })
    return Marketplace(products, list(classes), LocalImageStore(Path.cwd(), create=False))


def text_splits(train: tuple[Sequence[str], Sequence[int]], val: tuple[Sequence[str], Sequence[int]],
                classes: Sequence[str]) -> dict[str, Marketplace]:
    """``train`` and ``val`` marketplaces (what a family's ``train`` reads) from (texts, labels) pairs."""
    return {"train": text_marketplace(*train, classes, prefix="t"), "val": text_marketplace(*val, classes, prefix="v")}
