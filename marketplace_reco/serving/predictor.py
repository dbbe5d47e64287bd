"""Predictions without HTTP: load any classifier by name and ask it about a listing's photos and/or its text.

    >>> predictor = Predictor.from_pretrained("fusion")
    >>> predictor.predict(image="sofa.jpg", text="Grey three-seater sofa, barely used").pred
    'Home & Garden'
    >>> predictor.predict(image=["sofa.jpg", "sofa-back.jpg"], text="Grey sofa").pred    # one listing, two photos

A listing's photos count together (their probabilities averaged, as in evaluation). A photo + text model also
answers a listing with photos and no text, or a text and no photo. The HTTP service uses the very same class, so
both answer identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from ..models import CheckpointMixin, load_model, mean_by_listing
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
                        max_image_pixels: int = DEFAULT_MAX_PIXELS, quantization: str | None = None) -> Predictor:
        """Load a classifier the way ``load_model`` does: checkpoint name, folder, ``s3://`` or hub repo id."""
        return cls(load_model(name_or_path, revision=revision, quantization=quantization), name=name_or_path,
                   max_image_pixels=max_image_pixels)

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
            "quantization": self.model.quantization,
        }

    def load_image(self, source: ImageSource, name: str | None = None) -> Image.Image:
        """Decode a photo under this predictor's pixel limit (``CorruptImageError``, ``ImageTooLargeError``)."""
        return load_image(source, max_pixels=self.max_image_pixels, name=name)

    def check_listings(self, image_counts: Sequence[int], texts: Sequence[str | None] | None) -> None:
        """Raise ``PredictorInputError`` unless the listings (``image_counts[i]`` photos with ``texts[i]``) are what
        this model takes: photos for a photo model, a non-empty text for a text model, a photo or a text (or both)
        for a photo + text model."""
        label = f"model {self.name!r} ({self.input_kind})"
        texts = list(texts) if texts is not None else []
        if any(image_counts) and not self.takes_images:
            raise PredictorInputError(f"{label} does not take images")
        if any(text is not None for text in texts) and not self.takes_texts:
            raise PredictorInputError(f"{label} does not take texts")
        if texts and len(texts) != len(image_counts) and self.takes_images:
            raise PredictorInputError(f"{label} needs one text per listing of photos; got {len(image_counts)} "
                                      f"listing(s) of photos and {len(texts)} text(s)")
        n = max(len(image_counts), len(texts))
        if not n:
            raise PredictorInputError(f"{label} needs {'an image' if self.takes_images else 'a text'}")
        for index in range(n):
            count = image_counts[index] if index < len(image_counts) else 0
            text = texts[index] if index < len(texts) else None
            has_text = text is not None and bool(text.strip())
            if text is not None and not has_text and (not self.takes_images or not count):
                raise PredictorInputError(f"text {index} is empty")
            if self.takes_images and not self.takes_texts and not count:
                raise PredictorInputError(f"{label} needs an image")
            if self.takes_texts and not self.takes_images and not has_text:
                raise PredictorInputError(f"{label} needs a text")
            if self.takes_images and self.takes_texts and not (count or has_text):
                raise PredictorInputError(f"{label} needs a photo or a text for listing {index}")

    def predict(self, image: ImageSource | Sequence[ImageSource] | None = None, text: str | None = None) -> Prediction:
        """Predict one listing from its photo or photos (PIL images, paths or bytes) and/or its text."""
        return self.predict_batch(images=None if image is None else [image], texts=None if text is None else [text])[0]

    def predict_batch(self, images: Sequence[ImageSource | Sequence[ImageSource] | None] | None = None,
                      texts: Sequence[str | None] | None = None) -> list[Prediction]:
        """Predict several listings in one model call; ``images[i]`` (a photo, a list of photos, or None) goes with
        ``texts[i]``."""
        listings = [[] if item is None else list(item) if isinstance(item, (list, tuple)) else [item]
                    for item in (images or [])]
        if images is None and texts is not None:
            listings = [[] for _ in texts]
        self.check_listings([len(photos) for photos in listings], texts)
        decoded = [[self.load_image(photo) for photo in photos] for photos in listings]
        return self.predict_decoded(decoded, None if texts is None else list(texts))

    def predict_decoded(self, images: list[list[Image.Image]], texts: list[str | None] | None) -> list[Prediction]:
        """One model call on listings already checked and decoded (the micro-batcher's entry point): ``images[i]``
        the photos of listing i, ``texts[i]`` its text.

        Raises ``ModelOutputError`` rather than answer with a probability that is not a finite number.
        """
        texts = texts if texts is not None else [None] * len(images)
        if self.input_kind == "image":
            photos = [photo for listing in images for photo in listing]
            owners = np.repeat(np.arange(len(images)), [len(listing) for listing in images])
            proba = mean_by_listing(self.model.predict_proba(images=photos), owners, len(images))
        elif self.input_kind == "text":
            proba = self.model.predict_proba(texts=texts)
        else:
            proba = self.model.predict_proba(images=[listing or None for listing in images], texts=texts)
        invalid = np.flatnonzero(~np.isfinite(proba).all(axis=1))
        if invalid.size:
            raise ModelOutputError(
                f"model {self.name!r} (revision {self.revision}) returned probabilities that are not finite numbers "
                f"for {invalid.size} of its {len(proba)} inputs (the first: input {invalid[0]}); its weights are "
                "broken or its computation overflows")
        known_tokens = self._known_tokens(texts)
        return [self._prediction(row, known, bool(listing), text)
                for row, known, listing, text in zip(proba, known_tokens, images, texts, strict=True)]

    @property
    def embeds(self) -> bool:
        """Whether the model gives listing vectors (``embed``): the torch models do."""
        return callable(getattr(self.model, "embed", None))

    def embed(self, image: ImageSource | Sequence[ImageSource] | None = None, text: str | None = None) -> np.ndarray:
        """``[dim]`` the unit vector of one listing from its photo or photos and/or its text (``model.embed``)."""
        listing = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        texts = None if text is None else [text]
        self.check_listings([len(listing)], texts)
        return self.embed_decoded([[self.load_image(photo) for photo in listing]], texts)[0]

    def embed_decoded(self, images: list[list[Image.Image]], texts: list[str | None] | None) -> np.ndarray:
        """``[n, dim]`` unit vectors of listings already checked and decoded (the embedding micro-batcher's entry
        point); raises ``ModelOutputError`` rather than answer with a vector that is not finite."""
        if not self.embeds:
            raise PredictorInputError(f"model {self.name!r} ({self.model.model_type}) gives no listing vectors")
        if self.input_kind == "image":
            vectors = self.model.embed(images=images)
        elif self.input_kind == "text":
            vectors = self.model.embed(texts=texts)
        else:
            vectors = self.model.embed(images=[listing or None for listing in images],
                                       texts=texts if texts is not None else [None] * len(images))
        invalid = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if invalid.size:
            raise ModelOutputError(f"model {self.name!r} (revision {self.revision}) returned vectors that are not "
                                   f"finite numbers for {invalid.size} of its {len(vectors)} inputs")
        return vectors

    def _known_tokens(self, texts: list[str | None]) -> list[int | None]:
        # Text models count the words of each text they have a vector for (``known_token_counts``).
        count = getattr(self.model, "known_token_counts", None)
        present = [index for index, text in enumerate(texts) if text is not None and text.strip()]
        known: list[int | None] = [None] * len(texts)
        if count is not None and present:
            for index, value in zip(present, count([texts[i] for i in present]), strict=True):
                known[index] = int(value)
        return known

    def _prediction(self, proba: np.ndarray, known_tokens: int | None, has_photos: bool, text: str | None
                    ) -> Prediction:
        order = np.argsort(-proba, kind="stable")
        ranked = [self.classes[i] for i in order]
        warning = None
        if self.takes_images and self.takes_texts and not has_photos:
            warning = "no photo: the prediction rests on the text alone"
        elif self.takes_images and self.takes_texts and not (text and text.strip()):
            warning = "no text: the prediction rests on the photos alone"
        elif known_tokens == 0:
            rests_on = "the photos alone" if self.takes_images else "the classes' base rates, not the text"
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
