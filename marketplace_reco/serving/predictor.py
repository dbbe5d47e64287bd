"""Predictions without HTTP: load any classifier by name and ask it about a photo and/or a text.

    >>> predictor = Predictor.from_pretrained("fusion")
    >>> predictor.predict(image="sofa.jpg", text="Grey three-seater sofa, barely used").pred
    'Home & Garden'

The HTTP service uses the very same class, so both answer identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from ..models import CheckpointMixin, load_model
from .schemas import Prediction

#: What each classifier input kind consumes.
_TAKES_IMAGES = {"image": True, "text": False, "image+text": True}
_TAKES_TEXTS = {"image": False, "text": True, "image+text": True}


class PredictorInputError(ValueError):
    """The inputs do not fit the model: a missing or unexpected image or text, an empty text, unequal counts."""


class ModelOutputError(RuntimeError):
    """The model answered with probabilities that are not finite numbers: broken weights, or an overflow."""


class Predictor:
    """A loaded classifier with input checks, image decoding and ranked, named results."""

    def __init__(self, model: CheckpointMixin, *, name: str | None = None,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if model.input_kind not in _TAKES_IMAGES:
            raise PredictorInputError(
                f"model type {model.model_type!r} is not a classifier (input kind {model.input_kind!r})"
            )
        self.model = model
        self.name = name or model.source.get("name") or model.model_type
        self.revision = model.source.get("revision", "")
        self.max_image_pixels = max_image_pixels
        self.classes: list[str] = list(model.config["classes"])

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, *,
                        max_image_pixels: int = DEFAULT_MAX_PIXELS) -> Predictor:
        """Load a classifier the way ``load_model`` does: checkpoint name, folder, ``s3://`` or hub repo id."""
        return cls(load_model(name_or_path, revision=revision), name=name_or_path, max_image_pixels=max_image_pixels)

    @property
    def input_kind(self) -> str:
        return self.model.input_kind

    @property
    def takes_images(self) -> bool:
        return _TAKES_IMAGES[self.input_kind]

    @property
    def takes_texts(self) -> bool:
        return _TAKES_TEXTS[self.input_kind]

    def describe(self) -> dict[str, Any]:
        """Name, revision, type, classes, preprocessing and training metrics (what ``GET /models`` shows)."""
        config = self.model.config
        return {
            "name": self.name,
            "revision": self.revision,
            "model_type": self.model.model_type,
            "input_kind": self.input_kind,
            "classes": self.classes,
            "preprocessing": config.get("preprocessing") or {},
            "metrics": config.get("metrics") or {},
        }

    def load_image(self, source: ImageSource, name: str | None = None) -> Image.Image:
        """Decode a photo under this predictor's pixel limit (``CorruptImageError``, ``ImageTooLargeError``)."""
        return load_image(source, max_pixels=self.max_image_pixels, name=name)

    def check_inputs(self, n_images: int, texts: Sequence[str] | None) -> None:
        """Raise ``PredictorInputError`` unless the inputs are what this model takes, one text per image."""
        n_texts = 0 if texts is None else len(texts)
        label = f"model {self.name!r} ({self.input_kind})"
        if n_images and not self.takes_images:
            raise PredictorInputError(f"{label} does not take images")
        if n_texts and not self.takes_texts:
            raise PredictorInputError(f"{label} does not take texts")
        if self.takes_images and not n_images:
            raise PredictorInputError(f"{label} needs an image")
        if self.takes_texts and not n_texts:
            raise PredictorInputError(f"{label} needs a text")
        if self.takes_images and self.takes_texts and n_images != n_texts:
            raise PredictorInputError(f"{label} needs one text per image; got {n_images} images and {n_texts} texts")
        for index, text in enumerate(texts or ()):
            if not text.strip():
                raise PredictorInputError(f"text {index} is empty")

    def predict(self, image: ImageSource | None = None, text: str | None = None) -> Prediction:
        """Predict one listing from a photo (PIL image, path or bytes) and/or its text."""
        return self.predict_batch(images=None if image is None else [image], texts=None if text is None else [text])[0]

    def predict_batch(self, images: Sequence[ImageSource] | None = None,
                      texts: Sequence[str] | None = None) -> list[Prediction]:
        """Predict several listings in one model call; ``images[i]`` goes with ``texts[i]``."""
        self.check_inputs(0 if images is None else len(images), texts)
        decoded = None if images is None else [self.load_image(image) for image in images]
        return self.predict_decoded(decoded, None if texts is None else list(texts))

    def predict_decoded(self, images: list[Image.Image] | None, texts: list[str] | None) -> list[Prediction]:
        """One model call on inputs already checked and decoded (the micro-batcher's entry point).

        Raises ``ModelOutputError`` rather than answer with a probability that is not a finite number.
        """
        proba = self.model.predict_proba(images=images, texts=texts)
        invalid = np.flatnonzero(~np.isfinite(proba).all(axis=1))
        if invalid.size:
            raise ModelOutputError(
                f"model {self.name!r} (revision {self.revision}) returned probabilities that are not finite numbers "
                f"for {invalid.size} of its {len(proba)} inputs (the first: input {invalid[0]}); its weights are "
                "broken or its computation overflows")
        known_tokens = self._known_tokens(texts, len(proba))
        return [self._prediction(row, known) for row, known in zip(proba, known_tokens, strict=True)]

    def _known_tokens(self, texts: list[str] | None, n: int) -> list[int | None]:
        # Text models count the words of each text they have a vector for (``known_token_counts``).
        count = getattr(self.model, "known_token_counts", None)
        if texts is None or count is None:
            return [None] * n
        return [int(known) for known in count(texts)]

    def _prediction(self, proba: np.ndarray, known_tokens: int | None) -> Prediction:
        order = np.argsort(-proba, kind="stable")
        ranked = [self.classes[i] for i in order]
        warning = None
        if known_tokens == 0:
            rests_on = "the photo alone" if self.takes_images else "the classes' base rates, not the text"
            warning = f"no word of the text is known to model {self.name!r}: the prediction rests on {rests_on}"
        return Prediction(
            pred=ranked[0],
            classes=ranked,
            probabilities={self.classes[i]: float(proba[i]) for i in order},
            model=self.name,
            revision=self.revision,
            known_tokens=known_tokens,
            warning=warning,
        )
