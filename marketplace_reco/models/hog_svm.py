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

A product with several photos is classified by averaging its photos' probabilities, as every image model is
evaluated (``training.evaluation``). Fitting lives in ``training.hog_svm``. Saved arrays: ``scale.mean``,
``scale.scale``, ``svm.coef``, ``svm.intercept``,
``calibration.temperature``; nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from PIL import Image
from scipy.special import softmax
from skimage.feature import hog, local_binary_pattern
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from .._progress import progress_bar
from ..data.images import ImageSource, letterbox, load_image
from ._checkpoint import CheckpointMixin
from ._registry import register_model
from .errors import ModelConfigError

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

    def fit(self, X: Sequence[ImageSource], y: Any = None) -> HOGTransformer:
        """Nothing to learn; present so the transformer fits in a ``Pipeline``."""
        return self

    def transform(self, X: Sequence[ImageSource]) -> np.ndarray:
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
        with progress_bar(total=len(images), desc="HOG features", unit="img",
                          disable=len(images) < _PROGRESS_MIN) as progress:
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
        C: float = 0.0003,
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

    # ---- fitted state --------------------------------------------------------------------------
    def extract_features(self, images: Sequence[ImageSource]) -> np.ndarray:
        """The HOG step alone: ``[n, n_features]`` features of PIL images, encoded bytes or paths."""
        return self.pipeline["hog"].transform(images)

    def load_fitted(self, scaler: StandardScaler, svm: LinearSVC, temperature: float) -> None:
        """Take the fitted scaler and SVM (``training.hog_svm``) and the softmax temperature as this model's state."""
        self.pipeline["svm"].C = svm.C
        self._record_config(C=float(svm.C))
        arrays = {"scale.mean": scaler.mean_, "scale.scale": scaler.scale_, "svm.coef": svm.coef_,
                  "svm.intercept": svm.intercept_, "calibration.temperature": np.array([temperature])}
        # Held exactly as a loaded checkpoint holds them (liblinear leaves coef_ Fortran-ordered, and BLAS sums in
        # another order for it): a trained model and its reloaded copy then agree bit for bit.
        self._load_state_arrays({key: np.ascontiguousarray(value, dtype=np.float64) for key, value in arrays.items()})

    # ---- prediction ----------------------------------------------------------------------------
    def decision_scores(self, features: np.ndarray) -> np.ndarray:
        """``[n, n_classes]`` SVM scores of extracted features (``extract_features``), before the temperature."""
        scores = self.pipeline[1:].decision_function(features)
        return np.column_stack([-scores, scores]) / 2 if scores.ndim == 1 else scores

    def predict_proba(self, images: Sequence[ImageSource] | None = None,
                      texts: Sequence[str] | None = None) -> np.ndarray:
        """``[n, n_classes]`` probabilities for PIL images (or encoded bytes, or paths); ``texts`` are not used."""
        if images is None:
            raise ModelConfigError("hog-svm classifies photos: pass images=")
        if len(images) == 0:
            return np.zeros((0, len(self.classes)))
        return self.predict_proba_features(self.extract_features(list(images)))

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        """Probabilities from already extracted features (``extract_features``)."""
        return softmax(self.decision_scores(features) / self.temperature, axis=1)
