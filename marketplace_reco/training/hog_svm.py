"""Fitting the HOG + linear SVM baseline: features once per photo, one SVM per C, the best on validation kept."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from .._progress import progress_bar
from ..data.dataset import Marketplace
from ..models.errors import ModelConfigError
from ..models.hog_svm import HogSvmClassifier
from .calibration import fit_temperature
from .distributed import DistributedContext
from .image_data import SplitImages
from .runs import TrainResult

logger = logging.getLogger(__name__)


@dataclass
class HogSvmTrainConfig:
    """How ``train`` fits the SVM (the features' parameters belong to the model)."""

    C_values: list[float] = field(default_factory=lambda: [0.0003], metadata={
        "flags": ["--C"], "help": "SVM regularisation value(s); with several, the best on the validation products "
                                  "(macro-F1) is kept"})


def fit(model: HogSvmClassifier, features: np.ndarray, labels: Sequence[int], val_features: np.ndarray | None = None,
        val_labels: Sequence[int] | None = None, *, C: float | None = None) -> HogSvmClassifier:
    """Fit the scaler and the SVM (with ``C``, default the model's) on extracted features, then the softmax
    temperature on the validation features; the model holds the result."""
    model.load_fitted(*_fit_parts(model, features, labels, val_features, val_labels, C))
    return model


def _fit_parts(model: HogSvmClassifier, features: np.ndarray, labels: Sequence[int], val_features: np.ndarray | None,
               val_labels: Sequence[int] | None, C: float | None) -> tuple[StandardScaler, LinearSVC, float]:
    labels = np.asarray(labels)
    absent = sorted(set(range(len(model.classes))) - set(labels.tolist()))
    if absent or labels.min() < 0 or labels.max() >= len(model.classes):
        raise ModelConfigError(f"training labels must be indices into the {len(model.classes)} classes and cover "
                               f"all of them; classes without examples: {[model.classes[i] for i in absent]}")
    scaler = StandardScaler().fit(features)
    svm = clone(model.pipeline["svm"])
    if C is not None:
        svm.set_params(C=C)
    svm.fit(scaler.transform(features), labels)
    if val_features is None or val_labels is None or not len(val_labels):
        return scaler, svm, 1.0
    model.load_fitted(scaler, svm, temperature=1.0)  # the scores the temperature divides
    return scaler, svm, fit_temperature(model.decision_scores(val_features), np.asarray(val_labels))


def _split_features(model: HogSvmClassifier, split: Marketplace, photos: SplitImages) -> np.ndarray:
    encoded = split.image_store.get_many(photos.image_ids, progress=True)
    return model.extract_features([encoded[image_id] for image_id in photos.image_ids])


def train(model: HogSvmClassifier, splits: dict[str, Marketplace], config: HogSvmTrainConfig,
          context: DistributedContext | None = None) -> TrainResult:
    """Extract the features of every training and validation photo once, fit one SVM per C, keep the best on the
    validation products (macro-F1, a product's photos' probabilities averaged) in ``model``.

    One process: scikit-learn's solver does not shard, and ``context`` is accepted for the common shape only.
    """
    if not config.C_values:
        raise ModelConfigError("C_values is empty: give at least one SVM regularisation value")
    photos = {name: SplitImages.from_split(splits[name], name) for name in ("train", "val")}
    started = time.perf_counter()
    features = {name: _split_features(model, splits[name], split_photos) for name, split_photos in photos.items()}
    extraction_s = time.perf_counter() - started

    started = time.perf_counter()
    val = photos["val"]
    search: dict[str, float] = {}
    best: tuple[float, tuple[StandardScaler, LinearSVC, float]] | None = None
    for c_value in progress_bar(config.C_values, desc="SVM per C", unit="fit"):
        parts = _fit_parts(model, features["train"], photos["train"].image_labels, features["val"], val.image_labels,
                           c_value)
        model.load_fitted(*parts)
        predicted = val.product_proba(model.predict_proba_features(features["val"])).argmax(axis=1)
        score = float(f1_score(val.product_labels, predicted, average="macro", labels=range(len(model.classes)),
                               zero_division=0))
        search[str(c_value)] = score
        logger.info("C=%g: validation product macro-F1 %.4f", c_value, score)
        if best is None or score > best[0]:
            best = (score, parts)
    assert best is not None  # C_values is not empty
    model.load_fitted(*best[1])
    training_s = time.perf_counter() - started
    return TrainResult(history=[], metrics={
        "validation_macro_f1_by_C": search,
        "temperature": model.temperature,
        "timing_s": {"feature_extraction": round(extraction_s, 2), "training": round(training_s, 2)},
    })
