"""Scoring any classifier on a split, per product, the same way for training runs, benchmarks and ``evaluate.py``.

One function per input kind, chosen by ``evaluate_model`` from the model's ``input_kind``:
- ``image``: every photo is classified and a product's probabilities are the mean of its photos' (products
  without a photo cannot be scored by a photo model and are left out); per-photo figures under ``per_image``;
- ``text``: one prediction per product from its cleaned text;
- ``image+text``: each product's photos together with its text (its text alone when it has no photo).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.dataset import Marketplace
from ..models import CheckpointMixin, load_model
from .benchmarks import markdown_table
from .image_data import SplitImages, image_chunks
from .metrics import evaluate
from .plots import plot_confusion_matrix

SPLIT_NAMES = ("train", "val", "test")
# Products per model call when scoring photo + text models: bounds the decoded photos held at once.
_LISTINGS_PER_CALL = 64
#: Classes listed by name in the evaluation table: the ones recalled worst.
_WORST_CLASSES = 3


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
    """Per-product metrics of a photo + text model: each product with all its photos and its text (a product
    without photos by its text alone), with the accuracy of the products that have photos under ``with_photos``."""
    products = split.products
    proba = []
    for start in range(0, len(products), _LISTINGS_PER_CALL):
        chunk = products.iloc[start:start + _LISTINGS_PER_CALL]
        ids = [image_id for image_ids in chunk["image_ids"] for image_id in image_ids]
        decoded = dict(zip(ids, split.load_images(ids), strict=True)) if ids else {}
        images = [[decoded[image_id] for image_id in image_ids] or None for image_ids in chunk["image_ids"]]
        proba.append(model.predict_proba(images=images, texts=chunk["text"].tolist()))
    proba_all = np.concatenate(proba)
    metrics = evaluate(split.label_indices, proba_all, model.classes, split=name)
    has_photos = products["image_ids"].map(len).to_numpy() > 0
    with_photos = evaluate(split.label_indices[has_photos], proba_all[has_photos], model.classes, split=name)
    metrics["unit"] = "products"
    metrics["with_photos"] = {key: with_photos[key] for key in ("n_samples", "accuracy", "macro_f1")}
    return metrics


_BY_INPUT_KIND = {"image": evaluate_images, "text": evaluate_texts, "image+text": evaluate_listings}


def evaluate_model(model: CheckpointMixin, split: Marketplace, name: str = "test") -> dict[str, Any]:
    """Held-out metrics of a classifier on ``split``, per product (see the module docstring)."""
    try:
        evaluate_kind = _BY_INPUT_KIND[model.input_kind]
    except KeyError:
        raise ValueError(f"model type {model.model_type!r} is not a classifier (input kind {model.input_kind!r}); "
                         "it cannot be evaluated") from None
    return evaluate_kind(model, split, name)


def evaluate_checkpoints(names: Sequence[str], marketplace: Marketplace, output: Path,
                         revision: str | None = None, quantization: str | None = None) -> dict[str, dict[str, Any]]:
    """Load each named checkpoint (quantized as a server with ``MARKETPLACE_QUANTIZATION`` would, if asked), score
    it on every product of ``marketplace`` and write its ``metrics.json`` and ``confusion_matrix.png`` under
    ``output/<name>[_<quantization>]/``; the metrics by name, each with its model's identity."""
    results = {}
    for name in names:
        model = load_model(name, revision=revision, quantization=quantization)
        # A model with nothing to quantize is scored as it is, and labelled so.
        label = name if model.quantization is None else f"{name} ({model.quantization})"
        metrics = evaluate_model(model, marketplace, name="evaluation")
        metrics["model"] = {"name": name, "type": model.model_type, "revision": model.source.get("revision", ""),
                            "quantization": model.quantization}
        folder = output / re.sub(r"[^\w.-]+", "_", label).strip("_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        plot_confusion_matrix(metrics, model.classes, folder / "confusion_matrix.png", f"{label} ({model.model_type})")
        metrics["model"]["output"] = str(folder)
        results[label] = metrics
    return results


def evaluation_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per evaluated model: products, accuracy, macro-F1, calibration error and the worst-recalled classes."""
    rows = []
    for name, metrics in results.items():
        recall = sorted(metrics["per_class"].items(), key=lambda item: item[1]["recall"])[:_WORST_CLASSES]
        ece = metrics.get("ece")
        rows.append([name, metrics["model"]["type"], metrics["model"]["revision"], f"{metrics['n_samples']:,}",
                     f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}",
                     "-" if ece is None else f"{ece:.4f}",
                     ", ".join(f"{cls} {values['recall']:.2f}" for cls, values in recall),
                     metrics["model"]["output"]])
    return markdown_table(["model", "type", "revision", "products", "accuracy", "macro-F1", "ECE",
                           "lowest recall", "metrics and confusion matrix"], rows)
