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
few thousand short training texts (``_AdversarialLoss``).

The checkpoint is self-contained: the embedding matrices are in its ``model.safetensors`` and the
vocabulary, text preprocessing and maximum length in its ``config.json``, so ``load_model`` alone
predicts from raw text. Padding never changes a prediction: inputs are trimmed to the longest text of
the batch and windows that reach into the padding are masked out of the max-pooling.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..training.distributed import DistributedContext, shard_sampler, single_process_context, wrap_model
from ..training.loop import FitResult, fit
from .checkpoint import TorchCheckpointMixin
from .registry import register_model
from .word2vec import PAD_INDEX, EncodedTexts, TokenEncoder, Word2VecEmbedding

# Inference batch size: bounds memory for long lists without slowing short ones.
_PREDICT_BATCH = 256
# Training batches are formed within runs of this many batches sorted by length.
_BUCKET_BATCHES = 50


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
class TextCNN(nn.Module, TorchCheckpointMixin):
    """Convolutional text classifier over word2vec embeddings: an ensemble of members, with a reusable feature layer."""

    input_kind = "text"
    description = (
        "Text CNN: word2vec embedding, convolutions of several widths max-pooled over time, dropout, a "
        "feature layer and a linear classifier over the cleaned listing name and description; an ensemble of "
        "independently trained members (each with adversarial training on its word vectors) whose probabilities "
        "are averaged."
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
    ) -> None:
        super().__init__()
        if not classes:
            raise ValueError("TextCNN needs at least one class")
        if max_length < 1 or not kernel_sizes or min(kernel_sizes) < 1:
            raise ValueError(f"TextCNN: max_length and kernel sizes must be positive, got {max_length}, {kernel_sizes}")
        if ensemble_size < 1:
            raise ValueError(f"TextCNN: ensemble_size must be at least 1, not {ensemble_size}")
        self.classes = list(classes)
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
        return torch.softmax(self(token_ids), dim=1)

    def extract_features(self, texts: Sequence[str]) -> np.ndarray:
        """[n, feature_dim] feature-layer activations of raw texts (the text half of the fusion model's input)."""
        return self._batched(texts, self.features)

    def predict_member_proba(self, texts: Sequence[str]) -> np.ndarray:
        """[n, ensemble_size, n_classes] each member's class probabilities (their spread shows disagreement)."""
        return self._batched(texts, lambda ids: self._member_log_probabilities(ids).exp())

    def predict_proba(self, images: Any = None, texts: Sequence[str] | None = None) -> np.ndarray:
        """[n, n_classes] class probabilities of raw texts; an empty or all-unknown text still gets a row."""
        if texts is None:
            raise ValueError("TextCNN.predict_proba needs texts=[...]; this model does not use images")
        return self._batched(texts, self._proba)


class _LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length texts drawn from a (possibly sharded) shuffled sampler.

    Each run of ``batch_size * _BUCKET_BATCHES`` indices is sorted by length, cut into batches and the
    batches shuffled, so a batch is padded to its own longest text rather than to one of the rare very long
    listings, which makes an epoch several times cheaper. Every rank gets the same number of batches.
    """

    def __init__(self, sampler: Sampler[int], lengths: np.ndarray, batch_size: int, seed: int) -> None:
        self.sampler = sampler
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        indices = list(self.sampler)
        chunk = self.batch_size * _BUCKET_BATCHES
        for start in range(0, len(indices), chunk):
            ordered = sorted(indices[start: start + chunk], key=lambda i: self.lengths[i])
            batches = [ordered[i: i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
            for b in rng.permutation(len(batches)):
                yield batches[b]

    def __len__(self) -> int:
        n, chunk = len(self.sampler), self.batch_size * _BUCKET_BATCHES  # type: ignore[arg-type]
        return (n // chunk) * _BUCKET_BATCHES + math.ceil((n % chunk) / self.batch_size)


class _AdversarialLoss:
    """Label-smoothed cross-entropy averaged with the same loss at adversarially moved word vectors.

    Adversarial training for text (Miyato et al., 2017): after the clean forward pass, each text's embedded
    tokens are moved, by ``epsilon`` times their own norm, in the direction that raises the loss fastest (its
    normalised gradient), and the member also learns from that worst nearby input. It keeps decisions from
    hanging on small differences between word vectors, which on the real listings' 4,600 training texts
    lifts held-out accuracy (``scripts/bench_text.py``). A forward hook on the member's embedding records the
    clean pass and adds the perturbation in the second; ``close`` removes it. In eval mode, or with
    ``epsilon`` 0, this is the plain cross-entropy.
    """

    def __init__(self, member: _KimCNN, epsilon: float, label_smoothing: float) -> None:
        self.member = member
        self.epsilon = epsilon
        self.label_smoothing = label_smoothing
        self._clean: tuple[torch.Tensor, torch.Tensor] | None = None  # the token ids and their embedding
        self._perturbation: torch.Tensor | None = None
        self._hook = member.embedding.register_forward_hook(self._on_embedding)

    def _training(self) -> bool:
        return self.epsilon > 0 and self.member.training and torch.is_grad_enabled()

    def _on_embedding(self, module: nn.Module, inputs: tuple[torch.Tensor],
                      output: torch.Tensor) -> torch.Tensor | None:
        if not self._training():
            return None
        if self._perturbation is not None:
            return output + self._perturbation
        # A frozen embedding's output needs a gradient too: it says which way to move the vectors.
        self._clean = (inputs[0], output if output.requires_grad else output.requires_grad_())
        return None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if self._clean is None or not self._training():
            return loss
        token_ids, embedded = self._clean
        self._clean = None
        (gradient,) = torch.autograd.grad(loss, embedded, retain_graph=True)
        gradient = gradient * (token_ids != PAD_INDEX).unsqueeze(2)
        scale = embedded.detach().flatten(1).norm(dim=1) / gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
        self._perturbation = self.epsilon * scale[:, None, None] * gradient
        try:
            adversarial = F.cross_entropy(self.member(token_ids), targets, label_smoothing=self.label_smoothing)
        finally:
            self._perturbation = None
        return (loss + adversarial) / 2

    def close(self) -> None:
        self._hook.remove()


def _loader(ids: np.ndarray, labels: np.ndarray, batch_size: int, context: DistributedContext, *, shuffle: bool,
            seed: int) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(ids), torch.as_tensor(labels, dtype=torch.long))
    sampler = shard_sampler(dataset, context, shuffle=shuffle, seed=seed)
    lengths = (ids != PAD_INDEX).sum(axis=1)
    return DataLoader(dataset, batch_sampler=_LengthBucketBatchSampler(sampler, lengths, batch_size, seed))


def train_text_cnn(
    model: TextCNN,
    train_texts: Sequence[str],
    train_labels: np.ndarray,
    val_texts: Sequence[str],
    val_labels: np.ndarray,
    *,
    epochs: int = 15,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.01,
    patience: int = 5,
    label_smoothing: float = 0.1,
    adversarial_epsilon: float = 0.05,
    seed: int = 0,
    context: DistributedContext | None = None,
) -> list[FitResult]:
    """Train ``model``'s members in place, one after the other; one ``FitResult`` per member.

    Each member: AdamW on label-smoothed cross-entropy with adversarial training on the word vectors
    (``adversarial_epsilon``: the perturbation's size relative to the embedded text; 0 turns it off, and
    halves the training time), a one-cycle LR schedule, batches of similar-length texts shuffled with seed
    ``seed + member``, early stopping on validation accuracy, and the weights of its best validation epoch.
    Under torchrun pass the context from ``init_distributed()``: each rank trains on its shard and DDP
    averages the gradients.
    """
    context = context or single_process_context(next(model.parameters()).device)
    train_ids, val_ids = model.encode(train_texts).ids, model.encode(val_texts).ids
    val = _loader(val_ids, val_labels, batch_size, context, shuffle=False, seed=seed)
    results = []
    for index, member in enumerate(model.members):
        member_seed = seed + index
        train = _loader(train_ids, train_labels, batch_size, context, shuffle=True, seed=member_seed)
        optimizer = torch.optim.AdamW([p for p in member.parameters() if p.requires_grad], lr=learning_rate,
                                      weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate,
                                                        total_steps=epochs * len(train))
        # Dropout masks differ per member too (the initial weights already do, from the caller's seed).
        torch.manual_seed(member_seed)
        loss = _AdversarialLoss(member, adversarial_epsilon, label_smoothing)
        try:
            results.append(fit(wrap_model(member, context), train, val, epochs=epochs, optimizer=optimizer,
                               scheduler=scheduler, loss_fn=loss, patience=patience, monitor="val_accuracy",
                               context=context, desc=f"text-cnn member {index + 1}/{len(model.members)}"))
        finally:
            loss.close()
    model.eval()
    return results


def members_history(results: Sequence[FitResult]) -> list[dict[str, float]]:
    """The members' epoch rows in one list, each with its ``member`` number (1-based), for curves and reports."""
    return [{**row, "member": index + 1} for index, result in enumerate(results) for row in result.history]
