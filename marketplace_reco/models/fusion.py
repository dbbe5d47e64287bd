"""Image + text fusion: a trained image classifier and text CNN, without their heads, feeding one new head.

The checkpoint holds copies of both branches (the image model's backbone and feature layer, the text CNN's
embedding, convolutions and feature layer), so it runs on its own; ``image_model``/``text_model`` in its
config record which checkpoints (name and revision) they were copied from.

Each branch's feature vector goes through its own LayerNorm, then both are concatenated and a dropout +
linear head gives the classes. Branches are frozen by default: their features are computed once per photo
and per text and cached, so training the head takes seconds. ``unfrozen`` fine-tunes a branch end to end
with the head: the text CNN entirely (its embedding only if it was fine-tuned in the text model), the image
branch as far as the image model trained it (its ``trainable_blocks`` and feature layer; its frozen trunk
stays frozen, and its outputs are still cached).

Why the head beats both branches rather than copying the better one: the branches' features on the
training split are overfit (the text CNN classifies its own training texts almost perfectly), so a head fit
on them would learn to trust text alone. Two things counter that: per-branch LayerNorm puts both feature
vectors on the same scale, and modality dropout hides one branch's features (zeroes them) for a random
``modality_dropout`` share of the training samples each, so the head must also learn to classify from each
branch alone, and combines them at test time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ._checkpoint import CheckpointMixin, TorchCheckpointMixin
from ._registry import register_model
from .errors import ModelConfigError
from .image_classifier import INFERENCE_BATCH_SIZE, ImageClassifier, upgrade_config
from .text_cnn import TextCNN

BRANCHES = ("image", "text")


def _origin(model: CheckpointMixin) -> dict[str, str]:
    return {"name": model.source.get("name", "in memory"), "revision": model.source.get("revision", "")}


@register_model("fusion")
class FusionClassifier(nn.Module, TorchCheckpointMixin):
    """Concatenated image and text features (LayerNorm per branch) -> dropout -> linear head."""

    input_kind = "image+text"
    description = ("Image + text fusion: the feature layers of a trained image classifier and text CNN, each "
                   "LayerNorm-ed, concatenated, and classified by a linear head trained with modality dropout.")

    def __init__(
        self,
        classes: list[str],
        image_config: dict[str, Any],
        text_config: dict[str, Any],
        image_model: dict[str, str] | None = None,
        text_model: dict[str, str] | None = None,
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
        unknown = sorted(set(unfrozen) - set(BRANCHES))
        if unknown:
            raise ModelConfigError(f"unfrozen: unknown branch(es) {unknown}; choose from {list(BRANCHES)}")
        if not 0.0 <= modality_dropout <= 0.5:
            raise ModelConfigError(f"modality_dropout must be between 0 and 0.5 (per branch), not {modality_dropout}")
        self.unfrozen = list(unfrozen)
        self.modality_dropout = modality_dropout
        #: Where the branches were copied from ({"name", "revision"}), for the record.
        self.image_model = image_model or {}
        self.text_model = text_model or {}
        # The trunk's weights come from the image model (or this checkpoint), never from a download.
        self.image_branch = ImageClassifier(**{**upgrade_config(image_config), "pretrained": False})
        del self.image_branch.head
        self.text_branch = TextCNN(**text_config)
        self.text_branch.drop_classifiers()
        for kind, branch in (("image", self.image_branch), ("text", self.text_branch)):
            if kind not in self.unfrozen:
                branch.requires_grad_(False)
        image_dim = self.image_branch.feature[0].out_features
        self.image_norm = nn.LayerNorm(image_dim)
        self.text_norm = nn.LayerNorm(self.text_branch.feature_dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(image_dim + self.text_branch.feature_dim,
                                                                  len(self.classes)))
        self.train()

    @classmethod
    def from_branches(cls, image_model: ImageClassifier, text_model: TextCNN, *, unfrozen: Sequence[str] = (),
                      **hyperparameters: Any) -> FusionClassifier:
        """A new fusion model whose branches are copies of the trained models' weights (heads left out)."""
        model = cls(image_model.classes, image_model.init_arguments(), text_model.init_arguments(),
                    image_model=_origin(image_model), text_model=_origin(text_model), unfrozen=list(unfrozen),
                    **hyperparameters)
        model.image_branch.load_state_dict(
            {k: v for k, v in image_model.state_dict().items() if not k.startswith("head.")}, strict=True)
        model.text_branch.load_state_dict(text_model.feature_state_dict(), strict=True)
        return model

    def train(self, mode: bool = True) -> FusionClassifier:
        """Frozen branches always run as at inference (no dropout): their features are cached that way."""
        super().train(mode)
        for kind, branch in (("image", self.image_branch), ("text", self.text_branch)):
            if kind not in self.unfrozen:
                branch.eval()
        return self

    # ---- forward ----------------------------------------------------------------------------------
    def fuse(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Logits [n, n_classes] from the branches' feature vectors (modality dropout while training)."""
        image = self.image_norm(image_features)
        text = self.text_norm(text_features)
        if self.training and self.modality_dropout > 0:
            # One draw per sample: hide the image, hide the text, or (most often) keep both.
            draw = torch.rand(len(image), 1, device=image.device)
            image = image * (draw >= self.modality_dropout)
            text = text * ((draw < self.modality_dropout) | (draw >= 2 * self.modality_dropout))
        return self.head(torch.cat([image, text], dim=1))

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of normalised photos [n, 3, h, w] and their listings' token ids [n, length]."""
        return self.fuse(self.image_branch.features(pixels), self.text_branch.features(token_ids))

    # ---- raw inputs -------------------------------------------------------------------------------
    def known_token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """[n] how many tokens of each text the text branch knows; 0 means the photo alone decides."""
        return self.text_branch.known_token_counts(texts)

    def predict_proba(self, images: Sequence[Image.Image] | None = None,
                      texts: Sequence[str] | None = None) -> np.ndarray:
        """Class probabilities [n, n_classes] of ``images[i]`` with ``texts[i]`` (one photo per listing text)."""
        if images is None or texts is None:
            raise ModelConfigError("FusionClassifier.predict_proba needs both images=[...] and texts=[...]")
        if len(images) != len(texts) or not len(images):
            raise ModelConfigError(f"FusionClassifier.predict_proba needs one image per text and at least one of "
                                   f"each, got {len(images)} image(s) and {len(texts)} text(s)")
        device = self.head[1].weight.device
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                token_ids = torch.from_numpy(self.text_branch.encode(texts).ids)
                chunks = []
                for start in range(0, len(images), INFERENCE_BATCH_SIZE):
                    stop = start + INFERENCE_BATCH_SIZE
                    pixels = self.image_branch.preprocess(images[start:stop]).to(device)
                    chunks.append(torch.softmax(self(pixels, token_ids[start:stop].to(device)), dim=1).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks).numpy()
