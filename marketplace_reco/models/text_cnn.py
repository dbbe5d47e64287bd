"""Text CNN over word2vec embeddings (Kim, 2014): convolutions of several widths, max-pooled over time.

One member: token ids -> embedding (word2vec vectors, frozen or fine-tuned) -> one Conv1d + ReLU per kernel
width -> max over time -> dropout -> feature layer (Linear + ReLU) -> dropout -> classes.

``ensemble_size`` members are trained one after the other from the same word2vec vectors, each with its own
seed (initialisation, batch order, dropout) and its own early stopping, and predict together: the model's
probabilities are the mean of theirs, and its feature vector (reused by the fusion model) is theirs side by
side. Why: one member's held-out accuracy varies by about a point from seed to seed on the real listings, and
averaging five such members gains 0.7 points over a typical one (``scripts/bench_text.py``).
Each member also learns from adversarial examples (Miyato et al., 2017): its training loss is averaged with
the loss at word vectors moved a little in the direction that raises it most, a regulariser that suits the
few thousand short training texts (``training.text_cnn``, where the members are trained).

The checkpoint is self-contained: the embedding matrices are in its ``model.safetensors`` and the
vocabulary, text preprocessing and maximum length in its ``config.json``, so ``load_model`` alone
predicts from raw text. Padding never changes a prediction: inputs are trimmed to the longest text of
the batch and windows that reach into the padding are masked out of the max-pooling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._calibration import TemperatureMixin, checked_temperature
from ._checkpoint import TorchCheckpointMixin
from ._listings import l2_normalize_rows
from ._registry import register_model
from .word2vec import PAD_INDEX, EncodedTexts, TokenEncoder, Word2VecEmbedding

# Inference batch size: bounds memory for long lists without slowing short ones.
_PREDICT_BATCH = 256


class _KimCNN(nn.Module):
    """One member of the ensemble: its own embedding (a copy of the word2vec vectors), convolutions and layers."""

    def __init__(self, vocabulary_size: int, embedding_dim: int, kernel_sizes: list[int], num_filters: int,
                 feature_dim: int, n_classes: int, dropout: float, fine_tune_embedding: bool) -> None:
        super().__init__()
        self.kernel_sizes = kernel_sizes
        self.embedding = nn.Embedding(vocabulary_size, embedding_dim, padding_idx=PAD_INDEX)
        self.embedding.weight.requires_grad_(fine_tune_embedding)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, num_filters, width) for width in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Linear(num_filters * len(kernel_sizes), feature_dim)
        self.classifier = nn.Linear(feature_dim, n_classes)

    def _trim(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop padding columns beyond the longest text (at least as wide as the widest kernel); lengths."""
        lengths = (token_ids != PAD_INDEX).sum(dim=1)
        width = max(int(lengths.max()) if len(lengths) else 0, max(self.kernel_sizes))
        if token_ids.shape[1] >= width:
            return token_ids[:, :width], lengths
        return F.pad(token_ids, (0, width - token_ids.shape[1]), value=PAD_INDEX), lengths

    def features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n, feature_dim] feature-layer activations of [n, length] token ids (trailing padding)."""
        token_ids, lengths = self._trim(token_ids)
        embedded = self.embedding(token_ids).transpose(1, 2)  # [n, dim, length]
        pooled = []
        for width, conv in zip(self.kernel_sizes, self.convs, strict=True):
            activations = F.relu(conv(embedded))  # [n, filters, length - width + 1]
            starts = torch.arange(activations.shape[2], device=token_ids.device)
            # A window counts if it lies inside the text; a text shorter than the kernel keeps its first window.
            inside = (starts[None, :] + width <= lengths[:, None]) | (starts[None, :] == 0)
            # ReLU outputs are >= 0, so a masked 0 never wins the max over a real window.
            pooled.append(activations.masked_fill(~inside[:, None, :], 0.0).amax(dim=2))
        return F.relu(self.feature(self.dropout(torch.cat(pooled, dim=1))))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n, n_classes] logits of [n, length] token ids."""
        return self.classifier(self.dropout(self.features(token_ids)))


@register_model("text-cnn")
class TextCNN(nn.Module, TemperatureMixin, TorchCheckpointMixin):
    """Convolutional text classifier over word2vec embeddings: an ensemble of members, with a reusable feature layer."""

    input_kind = "text"
    description = (
        "Text CNN: word2vec embedding, convolutions of several widths max-pooled over time, dropout, a "
        "feature layer and a linear classifier over the cleaned listing name and description; an ensemble of "
        "independently trained members (each with adversarial training on its word vectors) whose probabilities "
        "are averaged, then calibrated by a temperature fitted on validation texts."
    )

    def __init__(
        self,
        classes: list[str],
        vocabulary: list[str],
        preprocessing: dict[str, Any],
        embedding_dim: int = 128,
        max_length: int = 256,
        kernel_sizes: list[int] = (1, 2, 3, 5),  # type: ignore[assignment]  # a tuple keeps the default immutable
        num_filters: int = 128,
        feature_dim: int = 256,
        dropout: float = 0.5,
        fine_tune_embedding: bool = False,
        ensemble_size: int = 5,
        word2vec: dict[str, str] | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not classes:
            raise ValueError("TextCNN needs at least one class")
        if max_length < 1 or not kernel_sizes or min(kernel_sizes) < 1:
            raise ValueError(f"TextCNN: max_length and kernel sizes must be positive, got {max_length}, {kernel_sizes}")
        if ensemble_size < 1:
            raise ValueError(f"TextCNN: ensemble_size must be at least 1, not {ensemble_size}")
        self.classes = list(classes)
        #: ``predict_proba`` is the softmax of the ensemble's log-probabilities / temperature (fitted on validation).
        self.temperature = checked_temperature(temperature)
        self.max_length = max_length
        self.kernel_sizes = list(kernel_sizes)
        #: The word2vec checkpoint the embedding was initialised from ({"name", "revision"}), for the record.
        self.word2vec = word2vec or {}
        self.encoder = TokenEncoder(vocabulary, preprocessing)
        self.members = nn.ModuleList(
            _KimCNN(len(vocabulary), embedding_dim, self.kernel_sizes, num_filters, feature_dim, len(self.classes),
                    dropout, fine_tune_embedding)
            for _ in range(ensemble_size)
        )
        #: Width of ``features``: every member's feature layer side by side.
        self.feature_dim = feature_dim * ensemble_size

    @classmethod
    def from_word2vec(cls, embedding: Word2VecEmbedding, classes: Sequence[str], **hyperparameters: Any) -> TextCNN:
        """A new classifier whose members' embeddings start as (copies of) ``embedding``'s vectors and vocabulary."""
        model = cls(
            classes=list(classes),
            vocabulary=embedding.vocabulary,
            preprocessing=embedding.preprocessing,
            embedding_dim=embedding.dim,
            word2vec={"name": embedding.source.get("name", "in memory"),
                      "revision": embedding.source.get("revision", "")},
            **hyperparameters,
        )
        with torch.no_grad():
            for member in model.members:
                member.embedding.weight.copy_(torch.from_numpy(embedding.vectors))
        return model

    def drop_classifiers(self) -> None:
        """Remove the members' classification layers (the fusion model keeps only the features)."""
        for member in self.members:
            del member.classifier

    def feature_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights ``features`` uses: the state dict without the classification layers."""
        return {key: value for key, value in self.state_dict().items() if ".classifier." not in key}

    # ---- tensors ---------------------------------------------------------------------------------
    def features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n, feature_dim] every member's feature-layer activations of [n, length] token ids, side by side."""
        return torch.cat([member.features(token_ids) for member in self.members], dim=1)

    def _member_log_probabilities(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n, ensemble_size, n_classes] each member's log class probabilities."""
        return torch.stack([F.log_softmax(member(token_ids), dim=1) for member in self.members], dim=1)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n, n_classes] log of the members' mean class probabilities (usable as logits)."""
        return torch.logsumexp(self._member_log_probabilities(token_ids), dim=1) - math.log(len(self.members))

    # ---- raw text ----------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> EncodedTexts:
        """Token ids (truncated/padded to ``max_length``) and known-token counts of raw texts."""
        return self.encoder.encode(texts, self.max_length)

    def known_token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """[n] how many tokens of each text are in the vocabulary; 0 means the prediction rests on no known word."""
        return self.encode(texts).known

    def _batched(self, texts: Sequence[str], function: Any) -> np.ndarray:
        """``function`` over the encoded texts in inference mode, in batches, as one numpy array."""
        ids = torch.from_numpy(self.encode(texts).ids)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                # At least one call, so an empty list of texts still gives a [0, width] array.
                outputs = [function(ids[start: start + _PREDICT_BATCH].to(device)).float().cpu()
                           for start in range(0, max(len(ids), 1), _PREDICT_BATCH)]
        finally:
            self.train(was_training)
        return torch.cat(outputs).numpy()

    def _proba(self, token_ids: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(token_ids) / self.temperature, dim=1)

    def extract_features(self, texts: Sequence[str]) -> np.ndarray:
        """[n, feature_dim] feature-layer activations of raw texts (the text half of the fusion model's input)."""
        return self._batched(texts, self.features)

    @property
    def embedding_dim(self) -> int:
        """Width of ``embed``'s vectors: every member's feature layer side by side."""
        return self.feature_dim

    def embed(self, images: Any = None, texts: Sequence[str] | None = None) -> np.ndarray:
        """[n, embedding_dim] unit vectors of raw texts for similarity search: the members' feature-layer
        activations side by side (tokenised as for prediction), L2-normalised; ``images`` is ignored. A text with
        no known word gets the vector of an empty text."""
        if texts is None:
            raise ValueError("TextCNN.embed needs texts=[...]; this model does not use images")
        return l2_normalize_rows(self.extract_features(texts))

    def predict_member_proba(self, texts: Sequence[str]) -> np.ndarray:
        """[n, ensemble_size, n_classes] each member's class probabilities (their spread shows disagreement)."""
        return self._batched(texts, lambda ids: self._member_log_probabilities(ids).exp())

    def predict_proba(self, images: Any = None, texts: Sequence[str] | None = None) -> np.ndarray:
        """[n, n_classes] calibrated class probabilities of raw texts (the members' mean, sharpened or softened by
        ``temperature``); an empty or all-unknown text still gets a row."""
        if texts is None:
            raise ValueError("TextCNN.predict_proba needs texts=[...]; this model does not use images")
        return self._batched(texts, self._proba)
