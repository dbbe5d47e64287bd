"""Image + text fusion: a trained image classifier and a trained text model, combined by a fusion head.

The checkpoint holds complete copies of both branches, so it runs on its own; ``image_model``/``text_model`` in
its config record which checkpoints (name and revision) they were copied from. The text branch is any text
classifier with features (the text CNN, the transformer); each branch is rebuilt from its config's model type.

Two heads (``head``):
- ``"late"`` (the default): the branches' calibrated log-probabilities, weighted per class and branch, plus a
  bias per class: ``logits = w_image * log p_image + w_text * log p_text + b``. A listing's photos count as one
  image input (their probabilities averaged). The weights are fitted on the VALIDATION products, whose branch
  outputs behave like those of new listings; a head fitted on the training products would learn to trust the
  branch that is most overfit to them (the text CNN classifies its own training texts almost perfectly).
- ``"concat"``: each branch's feature vector LayerNorm-ed, concatenated, dropout and a linear head, trained on
  the training products with modality dropout (a random share of samples sees only one branch). ``unfrozen``
  fine-tunes a branch with the head: the text CNN entirely (its embedding only if it was fine-tuned in the
  text model), the image branch as far as the image model trained it.

A listing without a photo or with an empty text still gets an answer: with the late head it is the calibrated
answer of the branch that has an input; the concat head sees zeros for the missing branch, as modality dropout
taught it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ._checkpoint import CheckpointMixin, TorchCheckpointMixin
from ._listings import ListingImages, listing_groups, mean_by_listing
from ._registry import model_class, register_model
from .errors import ModelConfigError
from .image_classifier import ImageClassifier, upgrade_config

BRANCHES = ("image", "text")
HEADS = ("late", "concat")
# Branch types of fusion checkpoints saved before branches recorded their type.
_DEFAULT_TYPES = {"image": "image-classifier", "text": "text-cnn"}
# Listings per branch call in predict_proba: bounds the memory of decoded photos' tensors.
_CHUNK = 64


def _origin(model: CheckpointMixin) -> dict[str, str]:
    return {"name": model.source.get("name", "in memory"), "revision": model.source.get("revision", "")}


def branch_config(model: CheckpointMixin) -> dict[str, Any]:
    """What rebuilds a trained branch inside a fusion model: its type and init arguments."""
    return {"model_type": model.model_type, **model.init_arguments()}


def _build_branch(kind: str, config: dict[str, Any]) -> nn.Module:
    arguments = dict(config)
    model_type = arguments.pop("model_type", _DEFAULT_TYPES[kind])
    cls = model_class(model_type)
    if kind == "image":
        if cls is not ImageClassifier:
            raise ModelConfigError(f"the image branch must be an image-classifier, not {model_type!r}")
        # The trunk's weights come from the image model (or this checkpoint), never from a download.
        arguments = {**upgrade_config(arguments), "pretrained": False}
    branch = cls(**arguments)
    expected = "image" if kind == "image" else "text"
    if branch.input_kind != expected or not isinstance(branch, nn.Module):
        raise ModelConfigError(f"the {kind} branch must be a torch model of input kind {expected!r}; "
                               f"{model_type!r} is {branch.input_kind!r}")
    return branch


@register_model("fusion")
class FusionClassifier(nn.Module, TorchCheckpointMixin):
    """An image classifier and a text model combined by a late-fusion or a concatenation head."""

    input_kind = "image+text"
    description = ("Image + text fusion: a trained image classifier and a trained text model, combined either by "
                   "a per-class weighting of their calibrated log-probabilities fitted on validation listings "
                   "(late) or by a linear head over their concatenated features (concat); a listing's photos count "
                   "together, and a listing without a photo or text is answered by the other branch.")

    def __init__(
        self,
        classes: list[str],
        image_config: dict[str, Any],
        text_config: dict[str, Any],
        image_model: dict[str, str] | None = None,
        text_model: dict[str, str] | None = None,
        head: str = "late",
        unfrozen: list[str] = (),  # type: ignore[assignment]  # a tuple keeps the default immutable
        dropout: float = 0.3,
        modality_dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.classes = list(classes)
        for kind, config in (("image", image_config), ("text", text_config)):
            if list(config.get("classes", [])) != self.classes:
                raise ModelConfigError(f"the {kind} branch's classes {config.get('classes')} differ from the "
                                       f"fusion model's {self.classes}; train both branches on the same data")
        if head not in HEADS:
            raise ModelConfigError(f"head must be one of {list(HEADS)}, not {head!r}")
        unknown = sorted(set(unfrozen) - set(BRANCHES))
        if unknown:
            raise ModelConfigError(f"unfrozen: unknown branch(es) {unknown}; choose from {list(BRANCHES)}")
        if unfrozen and head != "concat":
            raise ModelConfigError("unfrozen branches train with the concat head (--head concat); the late head is "
                                   "fitted on the frozen branches' validation outputs")
        if not 0.0 <= modality_dropout <= 0.5:
            raise ModelConfigError(f"modality_dropout must be between 0 and 0.5 (per branch), not {modality_dropout}")
        self.head_kind = head
        self.unfrozen = list(unfrozen)
        self.modality_dropout = modality_dropout
        #: Where the branches were copied from ({"name", "revision"}), for the record.
        self.image_model = image_model or {}
        self.text_model = text_model or {}
        self.image_branch: ImageClassifier = _build_branch("image", image_config)  # type: ignore[assignment]
        self.text_branch = _build_branch("text", text_config)
        if "text" in self.unfrozen and not hasattr(self.text_branch, "encode"):
            raise ModelConfigError(f"the text branch ({self.text_branch.model_type}) cannot be unfrozen inside the "
                                   "fusion model: only the text CNN's token ids are cached; fine-tune it on its own")
        for kind, branch in (("image", self.image_branch), ("text", self.text_branch)):
            if kind not in self.unfrozen:
                branch.requires_grad_(False)
        n_classes = len(self.classes)
        if head == "late":
            self.image_weight = nn.Parameter(torch.ones(n_classes))
            self.text_weight = nn.Parameter(torch.ones(n_classes))
            self.bias = nn.Parameter(torch.zeros(n_classes))
        else:
            image_dim = self.image_branch.feature[0].out_features
            self.image_norm = nn.LayerNorm(image_dim)
            self.text_norm = nn.LayerNorm(self.text_branch.feature_dim)
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(image_dim + self.text_branch.feature_dim,
                                                                      n_classes))
        self.train()

    @classmethod
    def from_branches(cls, image_model: ImageClassifier, text_model: CheckpointMixin, *,
                      unfrozen: Sequence[str] = (), **hyperparameters: Any) -> FusionClassifier:
        """A new fusion model whose branches are copies of the trained models (their calibration included)."""
        model = cls(image_model.classes, branch_config(image_model), branch_config(text_model),
                    image_model=_origin(image_model), text_model=_origin(text_model), unfrozen=list(unfrozen),
                    **hyperparameters)
        model.image_branch.load_state_dict(image_model.state_dict(), strict=True)
        model.text_branch.load_state_dict(text_model.state_dict(), strict=True)  # type: ignore[attr-defined]
        # A text model's files (a transformer's tokenizer) are not in its state dict: copied the way a checkpoint
        # carries them.
        with tempfile.TemporaryDirectory(prefix="marketplace-reco-branch-") as tmp:
            text_model._save_extra_files(Path(tmp))
            model.text_branch._load_extra_files(Path(tmp))
        return model

    def train(self, mode: bool = True) -> FusionClassifier:
        """Frozen branches always run as at inference (no dropout): their outputs are cached that way."""
        super().train(mode)
        for kind, branch in (("image", self.image_branch), ("text", self.text_branch)):
            if kind not in self.unfrozen:
                branch.eval()
        return self

    def _int8_layers(self) -> list[str]:
        return [f"{branch}.{name}" for branch in ("image_branch", "text_branch")
                for name in getattr(self, branch)._int8_layers()]

    def _save_extra_files(self, folder: Path) -> list[str]:
        # A text branch with files of its own (a tokenizer) keeps them in a subfolder.
        return [f"text_branch/{name}" for name in self.text_branch._save_extra_files(folder / "text_branch")]

    def _load_extra_files(self, folder: Path) -> None:
        self.text_branch._load_extra_files(folder / "text_branch")

    # ---- the late head ----------------------------------------------------------------------------
    def late_logits(self, image_log_proba: torch.Tensor, text_log_proba: torch.Tensor) -> torch.Tensor:
        """Logits [n, n_classes] from both branches' log-probabilities (listings that have both inputs)."""
        return self.image_weight * image_log_proba + self.text_weight * text_log_proba + self.bias

    # ---- the concat head --------------------------------------------------------------------------
    def fuse(self, image_features: torch.Tensor, text_features: torch.Tensor, *,
             has_image: torch.Tensor | None = None, has_text: torch.Tensor | None = None) -> torch.Tensor:
        """Concat-head logits [n, n_classes] from the branches' feature vectors; a missing input (``has_*`` False)
        and, while training, modality dropout zero that branch's part."""
        image = self.image_norm(image_features)
        text = self.text_norm(text_features)
        if self.training and self.modality_dropout > 0:
            # One draw per sample: hide the image, hide the text, or (most often) keep both.
            draw = torch.rand(len(image), 1, device=image.device)
            image = image * (draw >= self.modality_dropout)
            text = text * ((draw < self.modality_dropout) | (draw >= 2 * self.modality_dropout))
        if has_image is not None:
            image = image * has_image[:, None]
        if has_text is not None:
            text = text * has_text[:, None]
        return self.head(torch.cat([image, text], dim=1))

    # ---- raw inputs -------------------------------------------------------------------------------
    def known_token_counts(self, texts: Sequence[str | None]) -> np.ndarray:
        """[n] how many tokens of each text the text branch knows; 0 means the photos alone decide."""
        return self.text_branch.known_token_counts([text or "" for text in texts])

    def predict_proba(self, images: Sequence[ListingImages] | None = None,
                      texts: Sequence[str | None] | None = None) -> np.ndarray:
        """Class probabilities [n, n_classes] of n listings: ``images[i]`` (a photo, a list of the listing's photos,
        or None) with ``texts[i]`` (a string; None or blank for no text). Each listing needs a photo or a text."""
        images, texts = _paired(images, texts, "predict_proba")
        rows = [self._predict_chunk(images[start:start + _CHUNK], texts[start:start + _CHUNK])
                for start in range(0, len(texts), _CHUNK)]
        return np.concatenate(rows) if rows else np.zeros((0, len(self.classes)), dtype=np.float32)

    @property
    def embedding_dim(self) -> int:
        """Width of ``embed``'s vectors: the image branch's part, then the text branch's."""
        return self.image_branch.embedding_dim + self.text_branch.embedding_dim

    def embed(self, images: Sequence[ListingImages] | None = None,
              texts: Sequence[str | None] | None = None) -> np.ndarray:
        """[n, embedding_dim] unit vectors of n listings (inputs as in ``predict_proba``) for similarity search:
        ``[image part | text part]``, each part its branch's ``embed`` (a unit vector).

        A listing with both inputs has each part scaled by 1/sqrt(2), so the vector is a unit vector and the cosine
        of two such listings is the mean of their photo and text cosines. A listing with one input has that part at
        full length and zeros for the other: it is still a unit vector, and its cosine to a listing with both
        inputs is its branch's cosine divided by sqrt(2), so listings alike in both modalities rank first.
        """
        images, texts = _paired(images, texts, "embed")
        rows = [self._embed_chunk(images[start:start + _CHUNK], texts[start:start + _CHUNK])
                for start in range(0, len(texts), _CHUNK)]
        return np.concatenate(rows) if rows else np.zeros((0, self.embedding_dim), dtype=np.float32)

    def _embed_chunk(self, images: list[ListingImages], texts: list[str | None]) -> np.ndarray:
        _, _, has_image, has_text = _present_inputs(images, texts)
        image_dim = self.image_branch.embedding_dim
        vectors = np.zeros((len(texts), self.embedding_dim), dtype=np.float32)
        if has_image.any():
            vectors[has_image, :image_dim] = self.image_branch.embed(
                images=[item for item, present in zip(images, has_image) if present])
        if has_text.any():
            vectors[has_text, image_dim:] = self.text_branch.embed(
                texts=[text for text, present in zip(texts, has_text) if present])
        vectors[has_image & has_text] /= np.float32(np.sqrt(2.0))
        return vectors

    def _predict_chunk(self, images: list[ListingImages], texts: list[str | None]) -> np.ndarray:
        photos, owners, has_image, has_text = _present_inputs(images, texts)
        text_inputs = [text if present else "" for text, present in zip(texts, has_text, strict=True)]
        if self.head_kind == "late":
            return self._late_proba(photos, owners, text_inputs, has_image, has_text)
        return self._concat_proba(photos, owners, text_inputs, has_image, has_text)

    def _late_proba(self, photos: list[Image.Image], owners: np.ndarray, texts: list[str], has_image: np.ndarray,
                    has_text: np.ndarray) -> np.ndarray:
        text_proba = self.text_branch.predict_proba(texts=texts)
        image_proba = text_proba.copy()  # rows of listings without a photo are replaced below
        if photos:
            image_proba = mean_by_listing(self.image_branch.predict_proba(images=photos), owners, len(texts))
        with torch.inference_mode():
            image_log = torch.log(torch.as_tensor(image_proba, dtype=torch.float32).clamp_min(1e-12))
            text_log = torch.log(torch.as_tensor(text_proba, dtype=torch.float32).clamp_min(1e-12))
            fused = torch.softmax(self.late_logits(image_log, text_log), dim=1).numpy()
        # A listing with one input is answered by that branch alone, as calibrated on its own.
        return np.where(has_image[:, None] & has_text[:, None], fused,
                        np.where(has_image[:, None], image_proba, text_proba)).astype(np.float32)

    def _concat_proba(self, photos: list[Image.Image], owners: np.ndarray, texts: list[str], has_image: np.ndarray,
                      has_text: np.ndarray) -> np.ndarray:
        image_features = np.zeros((len(texts), self.image_norm.normalized_shape[0]))
        if photos:
            image_features = mean_by_listing(self.image_branch.extract_features(photos), owners, len(texts))
        text_features = self.text_branch.extract_features(texts)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                logits = self.fuse(torch.as_tensor(image_features, dtype=torch.float32),
                                   torch.as_tensor(text_features, dtype=torch.float32),
                                   has_image=torch.as_tensor(has_image, dtype=torch.float32),
                                   has_text=torch.as_tensor(has_text, dtype=torch.float32))
        finally:
            self.train(was_training)
        return torch.softmax(logits, dim=1).numpy()


def _present_inputs(images: list[ListingImages], texts: list[str | None]
                    ) -> tuple[list[Image.Image], np.ndarray, np.ndarray, np.ndarray]:
    """The listings' photos and each photo's listing, and which listings have a photo and which a text; a listing
    with neither is an error."""
    photos, owners = listing_groups(images)
    has_image = np.bincount(owners, minlength=len(images)) > 0
    has_text = np.array([bool(text and text.strip()) for text in texts], dtype=bool)
    missing = ~(has_image | has_text)
    if missing.any():
        raise ModelConfigError(f"listing {int(np.flatnonzero(missing)[0])} has neither a photo nor a text")
    return photos, owners, has_image, has_text


def _paired(images: Sequence[ListingImages] | None, texts: Sequence[str | None] | None,
            method: str) -> tuple[list[ListingImages], list[str | None]]:
    """``images`` and ``texts`` as two lists of one entry per listing (None where a listing has no such input)."""
    if images is None and texts is None:
        raise ModelConfigError(f"FusionClassifier.{method} needs images=[...] and/or texts=[...]")
    n = len(images if images is not None else texts)  # type: ignore[arg-type]
    images = list(images) if images is not None else [None] * n
    texts = list(texts) if texts is not None else [None] * n
    if len(images) != len(texts):
        raise ModelConfigError(f"FusionClassifier.{method} needs one entry of images per text, got "
                               f"{len(images)} and {len(texts)}")
    return images, texts
