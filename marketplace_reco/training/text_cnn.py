"""Training the text CNN: its members one after the other, each on length-bucketed batches with adversarial
training on its word vectors, a one-cycle schedule and early stopping on validation accuracy; then the
ensemble's temperature is fitted on the validation texts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..data.dataset import Marketplace
from ..models.text_cnn import TextCNN
from ..models.word2vec import PAD_INDEX
from .calibration import calibrate_on_texts
from .distributed import DistributedContext, shard_sampler, single_process_context, wrap_model
from .loop import FitResult, fit, one_cycle_adamw
from .runs import TrainResult

# Training batches are formed within runs of this many batches sorted by length.
_BUCKET_BATCHES = 50


@dataclass
class TextCNNTrainConfig:
    """How each member of a ``TextCNN`` is trained."""

    epochs: int = field(default=15, metadata={"help": "maximum epochs per member; also its schedule's length"})
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    patience: int = field(default=5, metadata={
        "help": "stop a member after this many epochs without a better validation accuracy"})
    label_smoothing: float = field(default=0.1, metadata={"help": "share of each target spread over the other classes"})
    adversarial_epsilon: float = field(default=0.05, metadata={
        "help": "adversarial training: each text's word vectors are also moved this share of their norm in the "
                "direction that raises the loss most; 0 turns it off and halves the training time"})
    seed: int = 0


class LengthBucketBatchSampler(Sampler[list[int]]):
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

    def __init__(self, member: nn.Module, epsilon: float, label_smoothing: float) -> None:
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
    return DataLoader(dataset, batch_sampler=LengthBucketBatchSampler(sampler, lengths, batch_size, seed))


def train(model: TextCNN, splits: dict[str, Marketplace], config: TextCNNTrainConfig,
          context: DistributedContext | None = None) -> TrainResult:
    """Train ``model``'s members in place on the texts of ``splits["train"]``, one after the other.

    Each member: AdamW on label-smoothed cross-entropy with adversarial training on the word vectors
    (``adversarial_epsilon``: the perturbation's size relative to the embedded text; 0 turns it off, and
    halves the training time), a one-cycle LR schedule, batches of similar-length texts shuffled with seed
    ``seed + member``, early stopping on validation accuracy, and the weights of its best validation epoch.
    Under torchrun pass the context from ``init_distributed()``: each rank trains on its shard and DDP
    averages the gradients. The history has every member's epochs, each row with its ``member`` number.
    """
    context = context or single_process_context(next(model.parameters()).device)
    train_split, val_split = splits["train"], splits["val"]
    train_ids = model.encode(train_split.products["text"].tolist()).ids
    val = _loader(model.encode(val_split.products["text"].tolist()).ids, val_split.label_indices, config.batch_size,
                  context, shuffle=False, seed=config.seed)
    results: list[FitResult] = []
    for index, member in enumerate(model.members):
        member_seed = config.seed + index
        train_loader = _loader(train_ids, train_split.label_indices, config.batch_size, context, shuffle=True,
                               seed=member_seed)
        optimizer, scheduler = one_cycle_adamw(member, learning_rate=config.learning_rate,
                                               weight_decay=config.weight_decay,
                                               total_steps=config.epochs * len(train_loader))
        # Dropout masks differ per member too (the initial weights already do, from the caller's seed).
        torch.manual_seed(member_seed)
        loss = _AdversarialLoss(member, config.adversarial_epsilon, config.label_smoothing)
        try:
            results.append(fit(wrap_model(member, context), train_loader, val, epochs=config.epochs,
                               optimizer=optimizer, scheduler=scheduler, loss_fn=loss, patience=config.patience,
                               monitor="val_accuracy", context=context,
                               desc=f"text-cnn member {index + 1}/{len(model.members)}"))
        finally:
            loss.close()
    model.eval()
    # The ensemble's uncalibrated log-probabilities: what forward() gives and predict_proba divides by the temperature.
    val_scores = np.log(np.maximum(model.predict_member_proba(val_split.products["text"].tolist()).mean(axis=1),
                                   1e-12))
    val_labels = val_split.label_indices
    temperature, calibration = calibrate_on_texts(val_scores, val_labels)
    model.calibrate(temperature)
    return TrainResult(
        history=[{**row, "member": index + 1} for index, result in enumerate(results) for row in result.history],
        metrics={
            "best_epochs": [result.best_epoch for result in results],
            "member_validation_accuracy": [result.history[result.best_epoch - 1]["val_accuracy"] for result in results],
            "validation_accuracy": float((val_scores.argmax(axis=1) == val_labels).mean()),
            "calibration": calibration,
        },
    )
