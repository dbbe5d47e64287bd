"""Scoring any classifier on a split, per product, the same way for training runs, benchmarks and ``evaluate.py``.

One function per input kind, chosen by ``evaluate_model`` from the model's ``input_kind``:
- ``image``: every photo is classified and a product's probabilities are the mean of its photos' (products
  without a photo cannot be scored by a photo model and are left out); per-photo figures under ``per_image``;
- ``text``: one prediction per product from its cleaned text;
- ``image+text``: every photo paired with its product's text, averaged per product like photos.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.dataset import Marketplace
from ..models import CheckpointMixin
from .image_data import SplitImages, image_chunks
from .metrics import evaluate


def evaluate_images(model: CheckpointMixin, split: Marketplace, name: str = "test") -> dict[str, Any]:
    """Per-product metrics of a photo model (a product's photos' probabilities averaged)."""
    photos = SplitImages.from_split(split, name)
    proba = np.concatenate([model.predict_proba(images=images)
                            for images in image_chunks(split.image_store, photos.image_ids, desc=f"predict {name}")])
    return photos.evaluate(proba, model.classes, name)


def evaluate_texts(model: CheckpointMixin, split: Marketplace, name: str = "test") -> dict[str, Any]:
    """Per-product metrics of a text model, with how many texts held no word the model knows."""
    texts = split.products["text"].tolist()
    metrics = evaluate(split.label_indices, model.predict_proba(texts=texts), model.classes, split=name)
    metrics["unit"] = "products"
    if hasattr(model, "known_token_counts"):
        metrics["texts_without_known_word"] = int((model.known_token_counts(texts) == 0).sum())
    return metrics


def evaluate_listings(model: CheckpointMixin, split: Marketplace, name: str = "test") -> dict[str, Any]:
    """Per-product metrics of a photo + text model: each photo with its product's text, averaged per product."""
    photos = SplitImages.from_split(split, name)
    texts = split.product_texts(photos.image_products)
    chunks, start = [], 0
    for images in image_chunks(split.image_store, photos.image_ids, desc=f"predict {name}"):
        chunks.append(model.predict_proba(images=images, texts=texts[start:start + len(images)]))
        start += len(images)
    return photos.evaluate(np.concatenate(chunks), model.classes, name)


_BY_INPUT_KIND = {"image": evaluate_images, "text": evaluate_texts, "image+text": evaluate_listings}


def evaluate_model(model: CheckpointMixin, split: Marketplace, name: str = "test") -> dict[str, Any]:
    """Held-out metrics of a classifier on ``split``, per product (see the module docstring)."""
    try:
        evaluate_kind = _BY_INPUT_KIND[model.input_kind]
    except KeyError:
        raise ValueError(f"model type {model.model_type!r} is not a classifier (input kind {model.input_kind!r}); "
                         "it cannot be evaluated") from None
    return evaluate_kind(model, split, name)
