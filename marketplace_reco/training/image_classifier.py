"""Training the photo classifier's trainable part, with the frozen trunk's outputs computed once and cached.

Augmentation with a cache: ``augmented_views`` random views of each training photo (crop, flip, colour jitter:
``image_data.render_view``) go through the frozen trunk once, with the plain photo, and each epoch trains on
one of them per photo, drawn at random. The trunk's cost is paid once per view, never per epoch.

Calibration: after training, the temperature of ``predict_proba`` is fitted on the validation photos' logits (the
model's prediction views averaged, as it predicts) so that the mean probabilities of each validation product's
photos, the way products are scored and served, have the least negative log-likelihood.

Similar-listing search: a model with a retrieval descriptor (``models._retrieval``) then has its learned whitening
fitted on the pairs of photos of each training listing with two or more (``fit_retrieval``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.dataset import Marketplace
from ..data.image_store import ImageStore
from ..models.errors import ModelConfigError
from ..models.image_classifier import INFERENCE_BATCH_SIZE, PREDICTION_VIEWS, ImageClassifier
from .calibration import fit_temperature
from .distributed import DistributedContext, all_reduce_sum, single_process_context, wrap_model
from .feature_cache import DEFAULT_MEMORY_BUDGET, FeatureCache, cache_or_new, state_fingerprint
from .image_data import (
    CachedBatches,
    ImageBatches,
    RandomViewBatches,
    SplitImages,
    augmented_view_names,
    batch_loader,
    image_chunks,
    load_pixels,
    parse_view_key,
    render_view,
    view_key,
)
from .loop import fit, one_cycle_adamw
from .metrics import expected_calibration_error, same_listing_recall
from .runs import TrainResult


@dataclass
class ImageTrainConfig:
    """How an ``ImageClassifier``'s trainable part is trained."""

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate of the feature layer and head"})
    backbone_learning_rate: float = field(default=1e-4, metadata={
        "help": "peak learning rate of the backbone's trainable blocks"})
    weight_decay: float = 1e-4
    label_smoothing: float = field(default=0.1, metadata={"help": "share of each target spread over the other classes"})
    patience: int = 3
    augmented_views: int = field(default=0, metadata={
        "help": "augmented views (random resized crop, flip, colour jitter) of each training photo, run through the "
                "frozen trunk once and cached; each epoch trains on one of them or the plain photo, drawn at random "
                "per photo (0: the plain photo only)"})
    augment: bool = field(default=False, metadata={
        "help": "fresh random crops, flips and colour jitter every epoch (the whole network then runs every epoch: "
                "no feature cache; for a backbone trained from scratch)"})
    cache: bool = field(default=True, metadata={
        "help": "cache the frozen trunk's outputs (off: the whole network runs every epoch, for timing comparisons)"})
    cache_memory_gb: float = field(default=DEFAULT_MEMORY_BUDGET / 2**30, metadata={
        "help": "memory for cached trunk outputs per process; the rest spills to disk under .cache/features"})
    seed: int = 0


def _check(config: ImageTrainConfig) -> None:
    if config.augmented_views < 0:
        raise ModelConfigError(f"augmented_views must be 0 or more, not {config.augmented_views}")
    if config.augmented_views and (config.augment or not config.cache):
        raise ModelConfigError(
            "augmented_views are cached outputs of the frozen trunk: they need the feature cache and exclude "
            "--augment (fresh augmentation every epoch); with --augment or --no-cache pass --augmented-views 0")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ModelConfigError(f"label_smoothing must be in [0, 1), not {config.label_smoothing}")


class _FromTrunk(nn.Module):
    """An image classifier's trainable part as a module of the frozen trunk's (cached) outputs."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, *trunk_outputs: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.features_from_trunk(*trunk_outputs))


def trunk_fingerprint(model: ImageClassifier) -> str:
    """Hash of everything that determines ``frozen_trunk``'s output for a photo: a feature cache's key."""
    return state_fingerprint([model.backbone_name, model.preprocessing, model.trainable_module_names],
                             model.frozen_state_dict())


def cache_trunk_outputs(model: ImageClassifier, store: ImageStore, image_ids: Sequence[str], cache: FeatureCache,
                        *, views: Sequence[str] = ("plain",), desc: str = "frozen trunk") -> str:
    """Run the frozen trunk once for every photo and view (``image_data.render_view``) not yet in ``cache``, stored
    under ``image_data.view_key(image id, view)``; returns the fingerprint they are stored under."""
    fingerprint = trunk_fingerprint(model)
    device = next(model.parameters()).device
    # Photo-major order: a photo's views mostly fall in one batch, so it is decoded once.
    keys = [view_key(image_id, view) for image_id in dict.fromkeys(image_ids) for view in views]

    def compute(batch: list[str]) -> list[np.ndarray]:
        parsed = [parse_view_key(key) for key in batch]
        photos = list(dict.fromkeys(image_id for image_id, _ in parsed))
        pixels = load_pixels(store, photos, model.to_pixels, desc=None)
        row_of = {image_id: row for row, image_id in enumerate(photos)}
        rendered = torch.empty(len(batch), *pixels.shape[1:])
        for view in dict.fromkeys(view for _, view in parsed):
            at = [n for n, (_, v) in enumerate(parsed) if v == view]
            ids = [parsed[n][0] for n in at]
            rendered[at] = render_view(pixels[[row_of[image_id] for image_id in ids]], ids, view)
        return [t.cpu().numpy() for t in model.frozen_trunk(model.normalize(rendered).to(device))]

    with torch.inference_mode():
        cache.fill(fingerprint, keys, compute, batch_size=INFERENCE_BATCH_SIZE, desc=desc)
    return fingerprint


def _logits(module: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> np.ndarray:
    """[n, n_classes] logits of every item of ``dataset``, in order, at inference."""
    module.eval()
    chunks = []
    with torch.inference_mode():
        for inputs, _ in batch_loader(dataset, batch_size, shuffle=False):
            inputs = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
            chunks.append(module(*(t.to(device) for t in inputs)).double().cpu())
    return torch.cat(chunks).numpy()


def _all_rows(local: np.ndarray, context: DistributedContext, total: int) -> np.ndarray:
    """Every rank's rows ``rank, rank + world_size, ...`` (``SplitImages.shard(pad=False)``) put back together."""
    if not context.is_distributed:
        return local
    rows = np.zeros((total, local.shape[1]))
    rows[context.rank::context.world_size] = local
    return np.asarray(all_reduce_sum(rows.ravel().tolist(), context)).reshape(rows.shape)


def _calibrate(model: ImageClassifier, photos: SplitImages, logits: np.ndarray) -> dict[str, Any]:
    """Fit and set the model's temperature on validation logits (per product); the validation ECE before/after."""
    def product_ece(temperature: float) -> float:
        proba = torch.softmax(torch.from_numpy(logits / temperature), dim=1).numpy()
        return expected_calibration_error(photos.product_labels, photos.product_proba(proba))

    temperature = fit_temperature(logits, photos.image_labels, groups=photos.image_products)
    before = product_ece(1.0)
    model.calibrate(temperature)
    return {"temperature": temperature, "fitted_on": "validation products (their photos' probabilities averaged)",
            "validation_ece_before": before, "validation_ece_after": product_ece(temperature)}


#: Ridges of the learned whitening tried, as shares of the matching differences' mean variance; the one with the
#: best same-listing recall on the validation listings is kept (the first without validation pairs).
RETRIEVAL_REGULARIZATIONS = (0.3, 0.1, 1.0)


def learned_whitening(descriptors: np.ndarray, pairs: np.ndarray, dim: int,
                      regularization: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], projection [d, dim]) of a learned whitening (Mikolajczyk and Matas) of ``descriptors`` [n, d]:
    the covariance of the differences between matching rows ``pairs`` [m, 2], plus ``regularization`` times its
    mean variance on the diagonal (so that few pairs cannot make it singular), is whitened away, then the ``dim``
    directions of largest variance of the whitened rows are kept."""
    mean = descriptors.mean(axis=0)
    centred = descriptors - mean
    differences = centred[pairs[:, 0]] - centred[pairs[:, 1]]
    matching = differences.T @ differences / len(differences)
    matching += regularization * np.trace(matching) / len(matching) * np.eye(len(matching))
    values, vectors = np.linalg.eigh(matching)
    whiten = (vectors / np.sqrt(values)) @ vectors.T
    whitened = centred @ whiten
    values, vectors = np.linalg.eigh(whitened.T @ whitened / len(whitened))
    return mean, whiten @ vectors[:, np.argsort(-values)[:dim]]


def _listing_pairs(photos: SplitImages) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The photos of the listings with two or more (ids, their listings) and the pairs [m, 2] of rows that are
    photos of one listing (every photo with the listing's first)."""
    rows: dict[Any, list[int]] = {}
    for row, product in enumerate(photos.image_products):
        rows.setdefault(product, []).append(row)
    kept = [members for members in rows.values() if len(members) >= 2]
    order = [row for members in kept for row in members]
    position = {row: n for n, row in enumerate(order)}
    pairs = np.array([(position[members[0]], position[other]) for members in kept for other in members[1:]],
                     dtype=np.int64).reshape(-1, 2)
    return [photos.image_ids[row] for row in order], photos.image_products[order], pairs


def _descriptors(model: ImageClassifier, split: Marketplace, image_ids: Sequence[str], desc: str) -> np.ndarray:
    return np.concatenate([model.retrieval_descriptors(images)
                           for images in image_chunks(split.image_store, image_ids, desc=desc)])


def fit_retrieval(model: ImageClassifier, splits: dict[str, Marketplace]) -> dict[str, Any]:
    """Fit ``model``'s retrieval descriptor on its training listings with two or more photos: the centring of each
    block, and a learned whitening (``learned_whitening``) that brings two photos of one listing together, its ridge
    chosen from ``RETRIEVAL_REGULARIZATIONS`` by same-listing recall@10 on the validation listings (a photo as the
    query among every validation photo). Returns what the fit used and chose, and that recall for each ridge and for
    the pooled backbone output."""
    retrieval = model.retrieval
    if retrieval is None:
        raise ModelConfigError("fit_retrieval needs an image classifier created with retrieval settings")
    image_ids, _, pairs = _listing_pairs(SplitImages.from_split(splits["train"], "train"))
    if len(pairs) < 2:
        raise ModelConfigError(f"the retrieval whitening needs training listings with two or more photos; the "
                               f"training split has {len(pairs)} such pair(s)")
    raw = torch.from_numpy(_descriptors(model, splits["train"], image_ids, "retrieval descriptors (train)"))
    block_mean = raw.mean(dim=0)
    retrieval.set_whitening(block_mean, torch.zeros_like(block_mean), torch.zeros_like(retrieval.projection))
    with torch.inference_mode():
        normalized = retrieval.normalized_blocks(raw).double().numpy()
    metrics: dict[str, Any] = {"pairs": len(pairs), "photos": len(image_ids)}
    val_ids, val_owners, val_pairs = _listing_pairs(SplitImages.from_split(splits["val"], "validation"))
    if len(val_pairs):
        val_raw = torch.from_numpy(_descriptors(model, splits["val"], val_ids, "retrieval descriptors (validation)"))
        with torch.inference_mode():
            val_normalized = retrieval.normalized_blocks(val_raw).double().numpy()
        fits = {ridge: learned_whitening(normalized, pairs, retrieval.dim, ridge)
                for ridge in RETRIEVAL_REGULARIZATIONS}
        recall = {ridge: same_listing_recall((val_normalized - mean) @ projection, val_owners)
                  for ridge, (mean, projection) in fits.items()}
        chosen = max(recall, key=lambda ridge: recall[ridge])
        pooled = torch.split(val_raw, retrieval.block_widths, dim=1)[-2]  # the block before the colour histogram
        metrics["validation_same_listing_recall_at_10"] = {
            "pooled_output": same_listing_recall(pooled.numpy(), val_owners),
            **{f"regularization {ridge}": value for ridge, value in recall.items()}}
    else:  # nothing to choose the ridge by
        chosen = RETRIEVAL_REGULARIZATIONS[0]
        fits = {chosen: learned_whitening(normalized, pairs, retrieval.dim, chosen)}
    mean, projection = fits[chosen]
    retrieval.set_whitening(block_mean, torch.from_numpy(mean).float(), torch.from_numpy(projection).float())
    metrics["regularization"] = chosen
    return metrics


def train(model: ImageClassifier, splits: dict[str, Marketplace], config: ImageTrainConfig,
          context: DistributedContext | None = None, *, cache: FeatureCache | None = None) -> TrainResult:
    """Train ``model``'s trainable part in place on the photos of ``splits["train"]``, early stopping on validation
    loss, then calibrate it on the validation photos; the model ends with its best validation epoch's weights.

    With ``config.cache`` (and no ``augment``) the frozen trunk runs once per training photo and view (the plain
    photo and ``augmented_views`` augmented ones) and once per validation photo and prediction view, its
    outputs kept in ``cache`` (default: a new ``FeatureCache`` of ``config.cache_memory_gb``, closed at the end);
    every epoch then only runs the trainable part. With ``augment`` every epoch runs the whole network on
    freshly augmented photos. AdamW with a one-cycle LR schedule (the backbone's blocks at
    ``backbone_learning_rate``, the feature layer and head at ``learning_rate``), label-smoothed cross-entropy.
    Under torchrun pass the context from ``init_distributed()``: each rank trains on (and caches) its own share
    of the photos, DDP averages gradients, and the temperature is fitted on all ranks' validation logits.
    """
    _check(config)
    context = context or single_process_context(next(model.parameters()).device)
    model.to(context.device)
    train_split, val_split = splits["train"], splits["val"]
    train_photos = SplitImages.from_split(train_split, "train").shard(context.rank, context.world_size, pad=True)
    all_val_photos = SplitImages.from_split(val_split, "validation")
    val_photos = all_val_photos.shard(context.rank, context.world_size, pad=False)
    # A last batch of one photo is dropped: a trainable norm layer cannot normalise a single 1x1 activation.
    lone_last = len(train_photos.image_ids) % config.batch_size == 1
    optimizer, scheduler = one_cycle_adamw(
        model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        total_steps=config.epochs * (-(-len(train_photos.image_ids) // config.batch_size) - lone_last),
        part_learning_rates=[(model.backbone, config.backbone_learning_rate)])
    cached = config.cache and not config.augment
    with cache_or_new(cache, int(config.cache_memory_gb * 2**30)) as features:
        module: nn.Module
        if cached:
            train_views = ["plain", *augmented_view_names(config.augmented_views, config.seed)]
            fingerprint = cache_trunk_outputs(model, train_split.image_store, train_photos.image_ids, features,
                                              views=train_views,
                                              desc=f"frozen trunk (train, {len(train_views)} view(s))")
            cache_trunk_outputs(model, val_split.image_store, val_photos.image_ids, features,
                                views=model.prediction_views, desc="frozen trunk (validation)")
            train_set: Dataset = RandomViewBatches(
                features, fingerprint, [[view_key(i, view) for i in train_photos.image_ids] for view in train_views],
                train_photos.image_labels, seed=config.seed + context.rank)
            val_sets: list[Dataset] = [
                CachedBatches(features, [(fingerprint, [view_key(i, view) for i in val_photos.image_ids])],
                              val_photos.image_labels)
                for view in model.prediction_views]
            module = _FromTrunk(model)
        else:
            train_set = ImageBatches(load_pixels(train_split.image_store, train_photos.image_ids, model.to_pixels,
                                                 desc="decode train photos"),
                                     train_photos.image_labels, model.normalize, augment=config.augment,
                                     seed=config.seed)
            val_pixels = load_pixels(val_split.image_store, val_photos.image_ids, model.to_pixels,
                                     desc="decode validation photos")
            val_sets = [ImageBatches(PREDICTION_VIEWS[view](val_pixels), val_photos.image_labels, model.normalize,
                                     augment=False)
                        for view in model.prediction_views]
            module = model
        train_loader = batch_loader(train_set, config.batch_size, shuffle=True, seed=config.seed + context.rank,
                                    drop_last=lone_last)
        val_loader = batch_loader(val_sets[0], config.batch_size, shuffle=False)  # early stopping: plain photos
        result = fit(wrap_model(module, context), train_loader, val_loader, epochs=config.epochs,
                     optimizer=optimizer, scheduler=scheduler,
                     loss_fn=partial(F.cross_entropy, label_smoothing=config.label_smoothing),
                     patience=config.patience, monitor="val_loss", context=context, desc="image-classifier")
        val_logits = np.mean([_logits(module, dataset, config.batch_size, context.device) for dataset in val_sets],
                             axis=0)
    calibration = _calibrate(model, all_val_photos, _all_rows(val_logits, context, len(all_val_photos.image_ids)))
    model.eval()
    # Every rank fits the same whitening on all the training pairs: it is deterministic, and small beside training.
    retrieval = {"retrieval": fit_retrieval(model, splits)} if model.retrieval is not None else {}
    return TrainResult(history=result.history, metrics={
        "best_epoch": result.best_epoch,
        "validation_loss": result.history[result.best_epoch - 1]["val_loss"],
        "feature_cache": cached,
        "calibration": calibration,
        "training_config": dataclasses.asdict(config),
        **retrieval,
    })
