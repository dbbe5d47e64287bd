"""Training the fusion head (and any unfrozen branch) on one sample per photo with its product's text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.dataset import Marketplace
from ..models.fusion import FusionClassifier
from ..models.image_classifier import INFERENCE_BATCH_SIZE
from .distributed import DistributedContext, single_process_context, wrap_model
from .feature_cache import FeatureCache, cache_or_new, state_fingerprint
from .image_classifier import cache_trunk_outputs
from .image_data import CachedBatches, SplitImages, batch_loader, load_pixels
from .loop import fit, one_cycle_adamw
from .runs import TrainResult


@dataclass
class FusionTrainConfig:
    """How the fusion head (and any unfrozen branch) is trained."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5
    seed: int = 0


def branch_fingerprint(model: FusionClassifier, kind: str) -> str:
    """Hash of a branch's weights and input processing: the cache key of its feature vectors."""
    if kind == "image":
        return state_fingerprint(["image", model.image_branch.preprocessing], model.image_branch.state_dict())
    text_input = [model.text_branch.encoder.preprocessor.to_config(), model.text_branch.max_length]
    return state_fingerprint(["text", *text_input], model.text_branch.state_dict())


class _FromParts(nn.Module):
    """The fusion model as a module of cached inputs: image features or trunk outputs, text features or ids."""

    def __init__(self, model: FusionClassifier, n_image_inputs: int) -> None:
        super().__init__()
        self.model = model
        self.n_image_inputs = n_image_inputs

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        image_inputs, text_input = inputs[:self.n_image_inputs], inputs[self.n_image_inputs]
        model = self.model
        image = (model.image_branch.features_from_trunk(*image_inputs) if "image" in model.unfrozen
                 else image_inputs[0])
        text = model.text_branch.features(text_input) if "text" in model.unfrozen else text_input
        return model.fuse(image, text)


def _image_parts(model: FusionClassifier, split: Marketplace, photos: SplitImages, cache: FeatureCache,
                 name: str) -> tuple[tuple[str, list[str]], int]:
    """Cache the image branch's inputs for ``photos``: feature vectors (frozen) or its trunk's outputs (unfrozen)."""
    branch = model.image_branch
    if "image" in model.unfrozen:
        fingerprint = cache_trunk_outputs(branch, split.image_store, photos.image_ids, cache,
                                          desc=f"image trunk ({name})")
        return (fingerprint, photos.image_ids), len(branch.trunk_output_names)
    fingerprint = branch_fingerprint(model, "image")
    device = branch.feature[0].weight.device

    def compute(ids: list[str]) -> list[np.ndarray]:
        pixels = branch.normalize(load_pixels(split.image_store, ids, branch.to_pixels, desc=None)).to(device)
        return [branch.features(pixels).cpu().numpy()]

    with torch.inference_mode():
        cache.fill(fingerprint, photos.image_ids, compute, batch_size=INFERENCE_BATCH_SIZE,
                   desc=f"image features ({name})")
    return (fingerprint, photos.image_ids), 1


def _fusion_batches(model: FusionClassifier, split: Marketplace, photos: SplitImages, cache: FeatureCache,
                    name: str) -> tuple[CachedBatches, int]:
    """One sample per photo: the photo with its product's text; frozen branches' features come from ``cache``."""
    image_part, n_image_inputs = _image_parts(model, split, photos, cache, name)
    texts = split.product_texts(photos.image_products)
    if "text" in model.unfrozen:
        return CachedBatches(cache, [image_part], photos.image_labels,
                             extra=[torch.from_numpy(model.text_branch.encode(texts).ids)]), n_image_inputs
    fingerprint = branch_fingerprint(model, "text")
    products = list(dict.fromkeys(photos.image_products))
    by_product = dict(zip(photos.image_products, texts))
    cache.fill(fingerprint, products, lambda ids: [model.text_branch.extract_features([by_product[i] for i in ids])],
               batch_size=256, desc=f"text features ({name})")
    parts = [image_part, (fingerprint, list(photos.image_products))]
    return CachedBatches(cache, parts, photos.image_labels), n_image_inputs


def train(model: FusionClassifier, splits: dict[str, Marketplace], config: FusionTrainConfig,
          context: DistributedContext | None = None, *, cache: FeatureCache | None = None) -> TrainResult:
    """Train the head (and any unfrozen branch) in place, one sample per photo with its product's text.

    Frozen branches' feature vectors, and the image trunk's outputs of an unfrozen image branch, are computed
    once and kept in ``cache`` (default: a new ``FeatureCache``, closed at the end). AdamW with a one-cycle LR
    schedule, early stopping on validation loss; the model ends with its best epoch's weights. Under torchrun pass
    the context from ``init_distributed()``: each rank trains on its own share of the photos.
    """
    context = context or single_process_context(model.head[1].weight.device)
    model.to(context.device)
    train_split, val_split = splits["train"], splits["val"]
    train_photos = SplitImages.from_split(train_split, "train").shard(context.rank, context.world_size, pad=True)
    val_photos = SplitImages.from_split(val_split, "validation").shard(context.rank, context.world_size, pad=False)
    optimizer, scheduler = one_cycle_adamw(
        model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        total_steps=config.epochs * -(-len(train_photos.image_ids) // config.batch_size))
    with cache_or_new(cache) as features:
        train_set, n_image_inputs = _fusion_batches(model, train_split, train_photos, features, "train")
        val_set, _ = _fusion_batches(model, val_split, val_photos, features, "validation")
        train_loader = batch_loader(train_set, config.batch_size, shuffle=True, seed=config.seed + context.rank)
        val_loader = batch_loader(val_set, config.batch_size, shuffle=False)
        result = fit(wrap_model(_FromParts(model, n_image_inputs), context), train_loader, val_loader,
                     epochs=config.epochs, optimizer=optimizer, scheduler=scheduler, patience=config.patience,
                     monitor="val_loss", context=context, desc="fusion")
    model.eval()
    return TrainResult(history=result.history, metrics={
        "best_epoch": result.best_epoch,
        "validation_loss": result.history[result.best_epoch - 1]["val_loss"],
    })
