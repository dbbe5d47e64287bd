"""Fine-tuning the text transformer: the whole encoder (or its last layers) and the new head, on batches of
similar-length texts, with AdamW, a linear warm-up and decay, label smoothing, bf16 autocast and early stopping on
validation; then the lexical head (if the model has one) is fitted on the training texts and weighted on the
validation texts, and the temperature is fitted on the validation texts.

Why these defaults (measured on the real listings, 4,578 training products, 2 CPU cores): 256 word pieces (192 from
the start of the text, the rest from its end) read nearly every listing whole; batches of 32 at a peak LR of 1e-4
(the new head 10x that) with 10% warm-up; the word-embedding matrix (most of a small encoder's weights, and the
part a few thousand texts can least improve) stays frozen; bf16 autocast makes an epoch 1.7x faster on this CPU
at the same accuracy; at most 7 epochs (about 200 s each): with 5, validation accuracy was still
rising in the last epoch; patience 3, because validation accuracy on 575 texts moves by a point or two from one
epoch to the next (with 2, one split stopped after its 4th epoch). The lexical head added 0.9 points of validation
accuracy on split 0 (0.838 -> 0.847; its test figures are in reports/bench_text_transformer_lexical.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.dataset import Marketplace
from ..models.errors import ModelConfigError
from ..models.text_transformer import TextTransformerClassifier, encoder_layers, pad_batch
from .calibration import calibrate_on_texts, fit_temperature, mean_nll
from .distributed import DistributedContext, shard_sampler, single_process_context, wrap_model
from .loop import fit, warmup_linear_adamw
from .runs import TrainResult
from .text_cnn import LengthBucketBatchSampler

MONITORS = ("val_accuracy", "val_loss")
#: Weights of the lexical head's scores in the logits tried on validation texts (0: the encoder alone).
LEXICAL_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class TextTransformerTrainConfig:
    """How a ``TextTransformerClassifier`` is fine-tuned."""

    epochs: int = field(default=7, metadata={"help": "maximum epochs; also the length of the LR schedule"})
    batch_size: int = 32
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate of the encoder"})
    head_learning_rate_factor: float = field(default=10.0, metadata={
        "help": "the new feature layer and classifier learn this many times faster than the encoder"})
    weight_decay: float = 0.01
    warmup_fraction: float = field(default=0.1, metadata={
        "help": "share of the optimizer steps spent warming the LR up linearly; it then decays linearly to 0"})
    patience: int = 3
    monitor: str = field(default="val_accuracy", metadata={
        "choices": list(MONITORS), "help": "validation figure that early stopping and the kept epoch follow"})
    label_smoothing: float = field(default=0.1, metadata={"help": "share of each target spread over the other classes"})
    trainable_layers: int | None = field(default=None, metadata={
        "help": "fine-tune only the encoder's last N transformer layers (0: the head alone); default: all of it"})
    freeze_word_embeddings: bool = field(default=True, metadata={
        "help": "keep the word-piece embedding matrix as pretrained"})
    accumulation_steps: int = field(default=1, metadata={
        "help": "batches whose gradients add up before each optimizer step (effective batch = batch size x this "
                "x processes)"})
    bf16: bool = field(default=True, metadata={
        "help": "bfloat16 autocast for training and validation passes (the saved weights stay float32)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradients' global norm to this"})
    seed: int = 0


class _EncodedTexts(Dataset):
    """Word-piece ids of texts with their labels; batches are padded to their own longest text by ``collate``."""

    def __init__(self, ids: list[list[int]], labels: np.ndarray, pad_id: int) -> None:
        self.ids = ids
        self.labels = labels
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: Sequence[int]) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        ids, mask = pad_batch([self.ids[i] for i in indices], self.pad_id)
        return (ids, mask), torch.as_tensor(self.labels[list(indices)], dtype=torch.long)


def _loader(model: TextTransformerClassifier, split: Marketplace, batch_size: int, context: DistributedContext, *,
            shuffle: bool, seed: int) -> DataLoader:
    ids = model.tokenize(split.products["text"].tolist()).ids
    dataset = _EncodedTexts(ids, split.label_indices, model.tokenizer.pad_token_id or 0)  # type: ignore[union-attr]
    sampler = shard_sampler(dataset, context, shuffle=shuffle, seed=seed)
    lengths = np.array([len(row) for row in ids])
    return DataLoader(dataset, batch_sampler=LengthBucketBatchSampler(sampler, lengths, batch_size, seed),
                      collate_fn=dataset.collate)


def set_trainable(model: TextTransformerClassifier, config: TextTransformerTrainConfig) -> None:
    """Which of the encoder's weights learn: all but the word embeddings by default, or its last N layers."""
    model.requires_grad_(True)
    if config.trainable_layers is not None:
        layers = encoder_layers(model.encoder)
        if not 0 <= config.trainable_layers <= len(layers):
            raise ModelConfigError(f"trainable_layers must be between 0 and the encoder's {len(layers)} layers, "
                                   f"not {config.trainable_layers}")
        model.encoder.requires_grad_(False)
        for layer in layers[len(layers) - config.trainable_layers:]:
            layer.requires_grad_(True)
    if config.freeze_word_embeddings:
        model.encoder.get_input_embeddings().requires_grad_(False)


def train(model: TextTransformerClassifier, splits: dict[str, Marketplace], config: TextTransformerTrainConfig,
          context: DistributedContext | None = None) -> TrainResult:
    """Fine-tune ``model`` in place on the texts of ``splits["train"]``, keep its best validation epoch and fit its
    temperature on ``splits["val"]``.

    AdamW (decoupled weight decay, none on biases and norms) with a linear warm-up and decay over every optimizer
    step, label-smoothed cross-entropy, batches of similar-length texts (seed ``seed``), gradient accumulation,
    early stopping on ``monitor``. Under torchrun pass the context from ``init_distributed()``: each rank trains on
    its shard and DDP averages the gradients.
    """
    if config.monitor not in MONITORS:
        raise ModelConfigError(f"monitor must be one of {list(MONITORS)}, not {config.monitor!r}")
    if config.accumulation_steps < 1:
        raise ModelConfigError(f"accumulation_steps must be at least 1, not {config.accumulation_steps}")
    context = context or single_process_context(next(model.parameters()).device)
    set_trainable(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_loader = _loader(model, splits["train"], config.batch_size, context, shuffle=True, seed=config.seed)
    val_loader = _loader(model, splits["val"], config.batch_size, context, shuffle=False, seed=config.seed)
    head_rate = config.learning_rate * config.head_learning_rate_factor
    optimizer, scheduler = warmup_linear_adamw(
        model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        total_steps=config.epochs * math.ceil(len(train_loader) / config.accumulation_steps),
        warmup_fraction=config.warmup_fraction, part_learning_rates=[(model.feature, head_rate),
                                                                     (model.classifier, head_rate)])
    torch.manual_seed(config.seed)  # dropout masks
    result = fit(wrap_model(model, context), train_loader, val_loader, epochs=config.epochs, optimizer=optimizer,
                 scheduler=scheduler, loss_fn=partial(F.cross_entropy, label_smoothing=config.label_smoothing),
                 patience=config.patience, monitor=config.monitor, context=context, desc="text-transformer",  # type: ignore[arg-type]
                 accumulation_steps=config.accumulation_steps,
                 autocast_dtype=torch.bfloat16 if config.bf16 else None, max_grad_norm=config.max_grad_norm)
    model.eval()
    val_texts, val_labels = splits["val"].products["text"].tolist(), splits["val"].label_indices
    val_logits = model.logits(val_texts)  # the encoder's alone: a lexical head is still all zeros
    lexical = None
    if model.lexical is not None:
        lexical = fit_lexical_head(model, splits, val_logits, seed=config.seed)
        val_logits = val_logits + model.lexical_weight * model.lexical.scores(val_texts)  # what logits() now gives
    temperature, calibration = calibrate_on_texts(val_logits, val_labels)
    model.calibrate(temperature)
    return TrainResult(
        history=result.history,
        metrics={
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "validation_accuracy": float((val_logits.argmax(axis=1) == val_labels).mean()),
            **({"lexical_head": lexical} if lexical is not None else {}),
            "calibration": calibration,
            "trained_parameters": trainable,
        },
    )


def fit_lexical_head(model: TextTransformerClassifier, splits: dict[str, Marketplace], encoder_val_logits: np.ndarray,
                     *, seed: int) -> dict[str, Any]:
    """Fit the model's lexical head (``models._lexical``) on the training texts: the inverse document frequencies,
    then a linear SVM (C=1, the tuned TF-IDF reference of ``bench_text.py``); then its weight in the logits, the one
    of ``LEXICAL_WEIGHTS`` whose calibrated validation log-likelihood is best. What was tried goes in the metrics."""
    from sklearn.svm import LinearSVC

    head = model.lexical
    if head is None:
        raise ModelConfigError("this text-transformer has no lexical head (lexical_features=0)")
    train = splits["train"]
    counts = head.counts(train.products["text"].tolist())
    document_frequency = np.bincount(counts.indices, minlength=head.n_features)
    # scikit-learn's smooth idf; an n-gram no training text has weighs nothing, like a word outside a vocabulary
    # (a large idf would only make the known n-grams of a text count less against the biases).
    idf = np.log((1 + counts.shape[0]) / (1 + document_frequency)) + 1.0
    head.idf.copy_(torch.from_numpy(np.where(document_frequency > 0, idf, 0.0)))
    svm = LinearSVC(C=1.0, random_state=seed).fit(head.features(counts), train.label_indices)
    coef, intercept = svm.coef_, svm.intercept_
    if len(svm.classes_) == 2:  # a binary SVM has one row: the second class's score, the first's is its opposite
        coef, intercept = np.concatenate([-coef, coef]), np.concatenate([-intercept, intercept])
    head.weight.zero_()
    head.bias.zero_()
    head.weight[:, svm.classes_] = torch.from_numpy(coef.T.astype(np.float32))
    head.bias[svm.classes_] = torch.from_numpy(intercept.astype(np.float32))

    val_labels = splits["val"].label_indices
    lexical_val = head.scores(splits["val"].products["text"].tolist())
    tried = {}
    for candidate in LEXICAL_WEIGHTS:
        logits = encoder_val_logits + candidate * lexical_val
        temperature = fit_temperature(logits, val_labels)
        tried[candidate] = {
            "validation_nll": mean_nll(logits / temperature, val_labels),
            "validation_accuracy": float((logits.argmax(axis=1) == val_labels).mean())}
    best = min(tried, key=lambda candidate: tried[candidate]["validation_nll"])
    model.set_lexical_weight(best)
    return {"features": head.n_features, "weight": best,
            "weights_tried": {str(candidate): values for candidate, values in tried.items()}}
