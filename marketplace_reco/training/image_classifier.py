"""Training the photo classifier's trainable part, with the frozen trunk's outputs computed once and cached."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.dataset import Marketplace
from ..data.image_store import ImageStore
from ..models.image_classifier import INFERENCE_BATCH_SIZE, ImageClassifier
from .distributed import DistributedContext, single_process_context, wrap_model
from .feature_cache import DEFAULT_MEMORY_BUDGET, FeatureCache, cache_or_new, state_fingerprint
from .image_data import CachedBatches, ImageBatches, SplitImages, batch_loader, load_pixels
from .loop import fit, one_cycle_adamw
from .runs import TrainResult


@dataclass
class ImageTrainConfig:
    """How an ``ImageClassifier``'s trainable part is trained."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3
    augment: bool = field(default=False, metadata={
        "help": "random crops, flips and colour jitter each epoch (the whole network then runs every epoch: no "
                "feature cache)"})
    cache: bool = field(default=True, metadata={
        "help": "cache the frozen trunk's outputs (off: the whole network runs every epoch, for timing comparisons)"})
    cache_memory_gb: float = field(default=DEFAULT_MEMORY_BUDGET / 2**30, metadata={
        "help": "memory for cached trunk outputs per process; the rest spills to disk under .cache/features"})
    seed: int = 0


class _FromTrunk(nn.Module):
    """An image classifier's trainable part as a module of the frozen trunk's (cached) outputs."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, *trunk_outputs: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.features_from_trunk(*trunk_outputs))


def trunk_fingerprint(model: ImageClassifier) -> str:
    """Hash of everything that determines ``frozen_trunk``'s output for a photo: a feature cache's key."""
    return state_fingerprint([model.backbone_name, model.preprocessing, model.trainable_layer_names],
                             model.frozen_state_dict())


def cache_trunk_outputs(model: ImageClassifier, store: ImageStore, image_ids: Sequence[str], cache: FeatureCache,
                        *, desc: str = "frozen trunk") -> str:
    """Run the frozen trunk once for every photo not yet in ``cache``; returns the fingerprint it is stored under."""
    fingerprint = trunk_fingerprint(model)
    device = next(model.parameters()).device

    def compute(ids: list[str]) -> list[np.ndarray]:
        pixels = load_pixels(store, ids, model.to_pixels, desc=None)
        return [t.cpu().numpy() for t in model.frozen_trunk(model.normalize(pixels).to(device))]

    with torch.inference_mode():
        cache.fill(fingerprint, image_ids, compute, batch_size=INFERENCE_BATCH_SIZE, desc=desc)
    return fingerprint


def train(model: ImageClassifier, splits: dict[str, Marketplace], config: ImageTrainConfig,
          context: DistributedContext | None = None, *, cache: FeatureCache | None = None) -> TrainResult:
    """Train ``model``'s trainable part in place on the photos of ``splits["train"]``, early stopping on validation
    loss; the model ends with its best validation epoch's weights.

    Without augmentation (and with ``config.cache``) the frozen trunk runs once per photo and its outputs are
    kept in ``cache`` (default: a new ``FeatureCache`` of ``config.cache_memory_gb``, closed at the end), so every
    epoch only runs the trainable part. With ``augment`` every epoch runs the whole network on freshly augmented
    photos. AdamW with a one-cycle LR schedule. Under torchrun pass the context from ``init_distributed()``: each
    rank trains on (and caches) its own share of the photos, DDP averages gradients.
    """
    context = context or single_process_context(next(model.parameters()).device)
    model.to(context.device)
    train_split, val_split = splits["train"], splits["val"]
    train_photos = SplitImages.from_split(train_split, "train").shard(context.rank, context.world_size, pad=True)
    val_photos = SplitImages.from_split(val_split, "validation").shard(context.rank, context.world_size, pad=False)
    optimizer, scheduler = one_cycle_adamw(
        model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        total_steps=config.epochs * -(-len(train_photos.image_ids) // config.batch_size))
    cached = config.cache and not config.augment
    with cache_or_new(cache, int(config.cache_memory_gb * 2**30)) as features:
        module: nn.Module
        if cached:
            fingerprint = cache_trunk_outputs(model, train_split.image_store, train_photos.image_ids, features,
                                              desc="frozen trunk (train)")
            cache_trunk_outputs(model, val_split.image_store, val_photos.image_ids, features,
                                desc="frozen trunk (validation)")
            train_set: Dataset = CachedBatches(features, [(fingerprint, train_photos.image_ids)],
                                               train_photos.image_labels)
            val_set: Dataset = CachedBatches(features, [(fingerprint, val_photos.image_ids)],
                                             val_photos.image_labels)
            module = _FromTrunk(model)
        else:
            train_set = ImageBatches(load_pixels(train_split.image_store, train_photos.image_ids, model.to_pixels,
                                                 desc="decode train photos"),
                                     train_photos.image_labels, model.normalize, augment=config.augment,
                                     seed=config.seed)
            val_set = ImageBatches(load_pixels(val_split.image_store, val_photos.image_ids, model.to_pixels,
                                               desc="decode validation photos"),
                                   val_photos.image_labels, model.normalize, augment=False)
            module = model
        train_loader = batch_loader(train_set, config.batch_size, shuffle=True, seed=config.seed + context.rank)
        val_loader = batch_loader(val_set, config.batch_size, shuffle=False)
        result = fit(wrap_model(module, context), train_loader, val_loader, epochs=config.epochs,
                     optimizer=optimizer, scheduler=scheduler, patience=config.patience, monitor="val_loss",
                     context=context, desc="image-classifier")
    model.eval()
    return TrainResult(history=result.history, metrics={
        "best_epoch": result.best_epoch,
        "validation_loss": result.history[result.best_epoch - 1]["val_loss"],
        "feature_cache": cached,
    })
