"""HOG features + linear SVM image baseline, as a scikit-learn ``Pipeline`` whose arrays live in safetensors.

An image goes through ``Pipeline([("hog", HOGTransformer), ("scale", StandardScaler), ("svm", LinearSVC)])``:

1. letterbox to ``preprocessing["image_size"]`` (``data.images.letterbox``, black padding like the users' photos);
2. the feature vector, in this order: for each cell size in ``pixels_per_cell``, the HOG descriptor of the
   grey image (``orientations`` bins, ``cells_per_block`` blocks, L2-Hys); then, if ``colour_bins`` > 0, the
   square root of the normalised joint HSV histogram with ``colour_bins`` bins per channel (square root:
   a linear SVM then compares histograms by the Hellinger kernel); then, if ``lbp_grid`` > 0, normalised
   histograms of uniform local binary patterns (8 neighbours, radius 1: 10 codes) of the grey image, for
   the whole image and for each cell of an ``lbp_grid`` x ``lbp_grid`` grid (fine texture, which HOG's
   16-pixel cells average away). ``n_features`` in the config is the vector's length;
3. standardisation, then a one-vs-rest linear SVM with balanced class weights;
4. probabilities: a softmax of the SVM decision scores divided by a temperature fitted on validation data
   (minimum negative log-likelihood), so the classes can be ranked and the confidences mean something.

A product with several photos is classified by averaging its photos' probabilities (``train_hog_svm``
evaluates per product). Saved arrays: ``scale.mean``, ``scale.scale``, ``svm.coef``, ``svm.intercept``,
``calibration.temperature``; nothing is pickled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from PIL import Image
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from skimage.feature import hog, local_binary_pattern
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.metrics import f1_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from tqdm.auto import tqdm

from ..data.dataset import Marketplace
from ..data.images import ImageSource, letterbox, load_image
from ..training.metrics import evaluate
from .checkpoint import CheckpointMixin
from .errors import ModelConfigError
from .registry import register_model

logger = logging.getLogger(__name__)

DEFAULT_PREPROCESSING: dict[str, Any] = {"resize": "letterbox", "image_size": 128, "fill": [0, 0, 0]}
# Images per joblib task; below _PROGRESS_MIN images (a serving request) no progress bar is shown.
_CHUNK = 32
_PROGRESS_MIN = 2 * _CHUNK
# With n_jobs=None, batches this large use every core: each worker process first imports the package
# (torch and timm included, several seconds), which only pays off over thousands of photos.
_PARALLEL_MIN = 1000
# Uniform LBP with 8 neighbours has 8 + 2 codes: 9 uniform patterns and one bin for all others.
_LBP_POINTS = 8
_LBP_CODES = _LBP_POINTS + 2


def _image_features(image: ImageSource, params: dict[str, Any]) -> np.ndarray:
    """The feature vector of one image (layout in the module docstring)."""
    square = letterbox(load_image(image), params["image_size"], fill=tuple(params["fill"]))
    grey_bytes = np.asarray(square.convert("L"))
    grey = grey_bytes.astype(np.float32) / 255.0
    parts = [
        hog(grey, orientations=params["orientations"], pixels_per_cell=(cell, cell),
            cells_per_block=(params["cells_per_block"],) * 2, block_norm="L2-Hys", feature_vector=True)
        for cell in params["pixels_per_cell"]
    ]
    bins = params["colour_bins"]
    if bins:
        hsv = np.asarray(square.convert("HSV")).reshape(-1, 3)
        histogram, _ = np.histogramdd(hsv, bins=(bins,) * 3, range=((0, 256),) * 3)
        parts.append(np.sqrt(histogram.ravel() / hsv.shape[0]))
    grid = params["lbp_grid"]
    if grid:
        codes = local_binary_pattern(grey_bytes, _LBP_POINTS, 1, method="uniform")
        regions = [codes] + [cell for band in np.array_split(codes, grid, axis=0)
                             for cell in np.array_split(band, grid, axis=1)]
        parts.extend(np.bincount(region.astype(np.int64).ravel(), minlength=_LBP_CODES) / region.size
                     for region in regions)
    return np.concatenate(parts).astype(np.float32)


def _chunk_features(images: Sequence[ImageSource], params: dict[str, Any]) -> np.ndarray:
    return np.stack([_image_features(image, params) for image in images])


class HOGTransformer(BaseEstimator, TransformerMixin):
    """scikit-learn transformer: images (PIL, encoded bytes or paths) -> HOG (+ colour, texture) features.

    Stateless: ``fit`` learns nothing. ``n_jobs`` worker processes (joblib) share the work; None means all
    cores for batches of at least ``_PARALLEL_MIN`` images and in-process below.
    """

    def __init__(self, image_size: int = 128, fill: Sequence[int] = (0, 0, 0), orientations: int = 9,
                 pixels_per_cell: Sequence[int] = (16,), cells_per_block: int = 2, colour_bins: int = 0,
                 lbp_grid: int = 0, n_jobs: int | None = None) -> None:
        self.image_size = image_size
        self.fill = fill
        self.orientations = orientations
        self.pixels_per_cell = pixels_per_cell
        self.cells_per_block = cells_per_block
        self.colour_bins = colour_bins
        self.lbp_grid = lbp_grid
        self.n_jobs = n_jobs

    def _params(self) -> dict[str, Any]:
        return {"image_size": int(self.image_size), "fill": [int(v) for v in self.fill],
                "orientations": int(self.orientations), "pixels_per_cell": [int(c) for c in self.pixels_per_cell],
                "cells_per_block": int(self.cells_per_block), "colour_bins": int(self.colour_bins),
                "lbp_grid": int(self.lbp_grid)}

    def fit(self, X: Sequence[ImageSource], y: Any = None) -> HOGTransformer:  # noqa: N803 - sklearn's naming
        """Nothing to learn; present so the transformer fits in a ``Pipeline``."""
        return self

    def transform(self, X: Sequence[ImageSource]) -> np.ndarray:  # noqa: N803
        """``[n_images, n_features]`` float32 features, in input order."""
        params = self._params()
        images = list(X)
        if not images:
            return np.zeros((0, self.n_features), dtype=np.float32)
        chunks = [images[i:i + _CHUNK] for i in range(0, len(images), _CHUNK)]
        n_jobs = self.n_jobs if self.n_jobs is not None else (-1 if len(images) >= _PARALLEL_MIN else 1)
        if n_jobs == 1:
            blocks: Any = (_chunk_features(chunk, params) for chunk in chunks)
        else:
            blocks = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(_chunk_features)(c, params) for c in chunks)
        results = []
        with tqdm(total=len(images), desc="HOG features", unit="img", disable=len(images) < _PROGRESS_MIN) as progress:
            for block in blocks:
                results.append(block)
                progress.update(len(block))
        return np.concatenate(results)

    @property
    def n_features(self) -> int:
        """Length of the feature vector these parameters produce."""
        blank = Image.new("RGB", (int(self.image_size),) * 2)
        return int(_image_features(blank, self._params()).shape[0])


@register_model("hog-svm")
class HogSvmClassifier(CheckpointMixin):
    """HOG (+ colour, texture) features, standardised, one-vs-rest linear SVM, temperature-scaled softmax."""

    input_kind = "image"
    description = (
        "Image baseline: grey HOG descriptors at one or more cell sizes, plus optional HSV colour and local binary "
        "pattern texture histograms, of the letterboxed photo, standardised, then a one-vs-rest linear SVM with "
        "balanced class weights; "
        "probabilities are a softmax of the SVM scores divided by a temperature fitted on validation photos. "
        "A product with several photos averages its photos' probabilities."
    )

    def __init__(
        self,
        classes: list[str],
        preprocessing: dict[str, Any] | None = None,
        orientations: int = 9,
        pixels_per_cell: Sequence[int] = (16,),
        cells_per_block: int = 2,
        colour_bins: int = 8,
        lbp_grid: int = 2,
        C: float = 0.0003,  # noqa: N803 - the SVM's usual name
        max_iter: int = 5000,
        random_state: int = 0,
        n_features: int | None = None,
    ) -> None:
        if len(classes) < 2:
            raise ModelConfigError(f"hog-svm needs at least 2 classes, got {classes}")
        resolved = {**DEFAULT_PREPROCESSING, **(preprocessing or {})}
        unknown = sorted(set(resolved) - set(DEFAULT_PREPROCESSING))
        if unknown or resolved["resize"] != "letterbox":
            raise ModelConfigError(f"preprocessing {preprocessing} not supported: keys "
                                   f"{sorted(DEFAULT_PREPROCESSING)}, resize 'letterbox'")
        if not pixels_per_cell or min(pixels_per_cell) < 1 or min(orientations, cells_per_block) < 1:
            raise ModelConfigError(f"orientations ({orientations}), pixels_per_cell ({list(pixels_per_cell)}) and "
                                   f"cells_per_block ({cells_per_block}) must be positive")
        if colour_bins < 0 or lbp_grid < 0:
            raise ModelConfigError(f"colour_bins ({colour_bins}) and lbp_grid ({lbp_grid}) must be >= 0 (0: not used)")
        self.classes = list(classes)
        self.preprocessing = resolved
        hog_step = HOGTransformer(image_size=resolved["image_size"], fill=resolved["fill"], orientations=orientations,
                                  pixels_per_cell=tuple(pixels_per_cell), cells_per_block=cells_per_block,
                                  colour_bins=colour_bins, lbp_grid=lbp_grid)
        computed = hog_step.n_features
        if n_features is not None and n_features != computed:
            raise ModelConfigError(f"n_features is {n_features}, but these feature parameters give {computed}")
        self.n_features = computed
        self._record_config(preprocessing=resolved, n_features=computed)
        self.pipeline = Pipeline([
            ("hog", hog_step),
            ("scale", StandardScaler()),
            # The dual solver: for the small C these standardised features want, it converges several
            # times faster than the primal one (same optimum). It visits samples in a random order, hence
            # random_state, so that training is reproducible.
            ("svm", LinearSVC(C=C, class_weight="balanced", dual=True, max_iter=max_iter, random_state=random_state)),
        ])
        self.temperature = 1.0
        # Neutral arrays until trained: zero scores, so every class is equally likely.
        self._load_state_arrays(self._neutral_arrays())

    # ---- arrays --------------------------------------------------------------------------------
    def _neutral_arrays(self) -> dict[str, np.ndarray]:
        # A two-class LinearSVC keeps a single score row (positive = second class).
        rows = 1 if len(self.classes) == 2 else len(self.classes)
        return {
            "scale.mean": np.zeros(self.n_features),
            "scale.scale": np.ones(self.n_features),
            "svm.coef": np.zeros((rows, self.n_features)),
            "svm.intercept": np.zeros(rows),
            "calibration.temperature": np.ones(1),
        }

    def _state_arrays(self) -> dict[str, np.ndarray]:
        scaler, svm = self.pipeline["scale"], self.pipeline["svm"]
        arrays = {"scale.mean": scaler.mean_, "scale.scale": scaler.scale_, "svm.coef": svm.coef_,
                  "svm.intercept": svm.intercept_, "calibration.temperature": np.array([self.temperature])}
        return {key: np.ascontiguousarray(value, dtype=np.float64) for key, value in arrays.items()}

    def _load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        # The fitted attributes scikit-learn's transform/decision_function read, set from the arrays.
        scaler, svm = self.pipeline["scale"], self.pipeline["svm"]
        scaler.mean_ = arrays["scale.mean"]
        scaler.scale_ = arrays["scale.scale"]
        scaler.var_ = arrays["scale.scale"] ** 2
        scaler.n_features_in_ = self.n_features
        scaler.n_samples_seen_ = 0
        svm.coef_ = arrays["svm.coef"]
        svm.intercept_ = arrays["svm.intercept"]
        svm.classes_ = np.arange(len(self.classes))
        svm.n_features_in_ = self.n_features
        self.temperature = float(arrays["calibration.temperature"][0])

    # ---- training ------------------------------------------------------------------------------
    def extract_features(self, images: Sequence[ImageSource]) -> np.ndarray:
        """The HOG step alone: ``[n, n_features]`` features (also what a fusion model can consume)."""
        return self.pipeline["hog"].transform(images)

    def fit(self, images: Sequence[ImageSource], labels: Sequence[int], val_images: Sequence[ImageSource] | None = None,
            val_labels: Sequence[int] | None = None) -> HogSvmClassifier:
        """Train on images (PIL, bytes or paths) with label indices; validation images fit the temperature."""
        val_features = None if val_images is None else self.extract_features(val_images)
        return self.fit_features(self.extract_features(images), labels, val_features, val_labels)

    def fit_features(self, features: np.ndarray, labels: Sequence[int], val_features: np.ndarray | None = None,
                     val_labels: Sequence[int] | None = None) -> HogSvmClassifier:
        """Train the scaler and SVM on extracted features, then the temperature on validation features."""
        labels = np.asarray(labels)
        absent = sorted(set(range(len(self.classes))) - set(labels.tolist()))
        if absent or labels.min() < 0 or labels.max() >= len(self.classes):
            raise ModelConfigError(f"training labels must be indices into the {len(self.classes)} classes and cover "
                                   f"all of them; classes without examples: {[self.classes[i] for i in absent]}")
        self.pipeline[1:].fit(features, labels)
        # Hold the arrays exactly as a loaded checkpoint does (liblinear leaves coef_ Fortran-ordered, and BLAS
        # sums in a different order for it): a trained model and its reloaded copy then agree bit for bit.
        self._load_state_arrays(self._state_arrays())
        self.temperature = 1.0
        if val_features is not None and val_labels is not None and len(val_labels):
            self.temperature = _fit_temperature(self._scores(val_features, from_features=True), np.asarray(val_labels))
        return self

    # ---- prediction ----------------------------------------------------------------------------
    def _scores(self, inputs: Any, from_features: bool = False) -> np.ndarray:
        steps = self.pipeline[1:] if from_features else self.pipeline
        scores = steps.decision_function(inputs)
        return np.column_stack([-scores, scores]) / 2 if scores.ndim == 1 else scores

    def predict_proba(self, images: Sequence[ImageSource] | None = None,
                      texts: Sequence[str] | None = None) -> np.ndarray:
        """``[n, n_classes]`` probabilities for PIL images (or encoded bytes, or paths); ``texts`` are not used."""
        if images is None:
            raise ModelConfigError("hog-svm classifies photos: pass images=")
        if len(images) == 0:
            return np.zeros((0, len(self.classes)))
        return softmax(self._scores(list(images)) / self.temperature, axis=1)

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        """Probabilities from already extracted features (``extract_features``)."""
        return softmax(self._scores(features, from_features=True) / self.temperature, axis=1)


def _fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the negative log-likelihood of softmax(scores / T) (searched over log T)."""

    def _nll(log_t: float) -> float:
        return float(-log_softmax(scores / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    return float(np.exp(minimize_scalar(_nll, bounds=(-6.0, 6.0), method="bounded").x))


# ---- training run on a marketplace -----------------------------------------------------------
@dataclass
class _SplitImages:
    """The photos of one split: features, each photo's product and label, and each product's label."""

    features: np.ndarray
    image_products: np.ndarray
    image_labels: np.ndarray
    product_ids: np.ndarray
    product_labels: np.ndarray

    def product_proba(self, image_proba: np.ndarray) -> np.ndarray:
        """Average the photos' probabilities per product, in ``product_ids`` order."""
        frame = pd.DataFrame(image_proba).groupby(self.image_products, sort=False).mean()
        return frame.loc[self.product_ids].to_numpy()


def _split_images(model: HogSvmClassifier, split: Marketplace, name: str) -> _SplitImages:
    frame = split.images_frame()
    if frame.empty:
        raise ModelConfigError(f"the {name} split has no photos: an image model cannot be trained or evaluated on it")
    encoded = split.image_store.get_many(frame["image_id"].tolist(), progress=True)
    features = model.extract_features([encoded[image_id] for image_id in frame["image_id"]])
    labels = pd.Categorical(frame["label"], categories=model.classes).codes.astype(np.int64)
    products = frame.drop_duplicates("product_id")
    return _SplitImages(features, frame["product_id"].to_numpy(), labels, products["product_id"].to_numpy(),
                        pd.Categorical(products["label"], categories=model.classes).codes.astype(np.int64))


@dataclass
class HogSvmRun:
    """What ``train_hog_svm`` hands back: the best model, its held-out metrics and the data it saw."""

    model: HogSvmClassifier
    metrics: dict[str, Any]
    data_summary: dict[str, Any]


def train_hog_svm(splits: dict[str, Marketplace], C_values: Sequence[float] = (0.01,),  # noqa: N803
                  **hyperparameters: Any) -> HogSvmRun:
    """Extract features of every photo once, train one model per C, keep the best on validation (product
    macro-F1), and evaluate it on the held-out test products (photos' probabilities averaged per product).

    ``hyperparameters`` are ``HogSvmClassifier`` arguments (``orientations``, ``pixels_per_cell``, ...).
    The metrics are per product, with per-photo figures under ``per_image`` and timings under ``timing_s``.
    """
    if not C_values:
        raise ModelConfigError("C_values is empty: give at least one SVM regularisation value")
    classes = splits["train"].classes
    extractor = HogSvmClassifier(classes, **hyperparameters)
    started = time.perf_counter()
    data = {name: _split_images(extractor, splits[name], name) for name in ("train", "val", "test")}
    extraction_s = time.perf_counter() - started

    started = time.perf_counter()
    search: dict[str, float] = {}
    best: tuple[float, HogSvmClassifier] | None = None
    for c_value in tqdm(C_values, desc="SVM per C", unit="fit"):
        model = HogSvmClassifier(classes, C=c_value, **hyperparameters)
        model.fit_features(data["train"].features, data["train"].image_labels,
                           data["val"].features, data["val"].image_labels)
        val_proba = data["val"].product_proba(model.predict_proba_features(data["val"].features))
        score = float(f1_score(data["val"].product_labels, val_proba.argmax(axis=1), average="macro",
                               labels=range(len(classes)), zero_division=0))
        search[str(c_value)] = score
        logger.info("C=%g: validation product macro-F1 %.4f", c_value, score)
        if best is None or score > best[0]:
            best = (score, model)
    training_s = time.perf_counter() - started
    assert best is not None  # C_values is not empty
    model = best[1]

    test = data["test"]
    image_proba = model.predict_proba_features(test.features)
    metrics = evaluate(test.product_labels, test.product_proba(image_proba), classes, split="test")
    per_image = evaluate(test.image_labels, image_proba, classes, split="test")
    metrics.update({
        "unit": "products",
        "per_image": {key: per_image[key] for key in ("n_samples", "accuracy", "macro_f1")},
        "validation_macro_f1_by_C": search,
        "temperature": model.temperature,
        "timing_s": {"feature_extraction": round(extraction_s, 2), "training": round(training_s, 2)},
    })
    # Splits are subsets of one load: source and exclusions belong to the whole, not to each split.
    summary = {name: {key: value for key, value in split.summary().items() if key not in ("source", "excluded")}
               for name, split in splits.items()}
    data_summary = {"source": splits["train"].source, "split": "by product, stratified on the label", **summary}
    return HogSvmRun(model, metrics, data_summary)
