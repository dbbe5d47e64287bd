"""Fitting the fusion head: the late head on the validation products, the concat head (and any unfrozen branch) on
one training sample per photo with its product's text.

Why the late head is fitted on validation products: the branches were trained on the training products, and their
outputs there are far more confident than on listings they have never seen, so weights fitted on them would trust
the most overfit branch. On the validation products the branches behave as on new listings. The late head has
three numbers per class; their L2 pull towards plain log-linear fusion (weights 1, bias 0) is chosen by 5-fold
cross-validation within the validation products.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from ..data.dataset import Marketplace
from ..models import mean_by_listing
from ..models.fusion import FusionClassifier
from ..models.image_classifier import INFERENCE_BATCH_SIZE
from .distributed import DistributedContext, single_process_context, wrap_model
from .feature_cache import FeatureCache, cache_or_new, state_fingerprint
from .image_classifier import cache_trunk_outputs
from .image_data import CachedBatches, SplitImages, batch_loader, image_chunks, load_pixels
from .loop import fit, one_cycle_adamw
from .metrics import evaluate
from .runs import TrainResult

#: L2 strengths tried for the late head (chosen by cross-validation on the validation products).
LATE_L2_GRID = (0.001, 0.01, 0.1, 1.0)
_LATE_FOLDS = 5


@dataclass
class FusionTrainConfig:
    """How the fusion head is fitted; the optimiser options apply to the concat head (the late head is fitted
    exactly, by L-BFGS)."""

    late_l2: list[float] = field(default_factory=lambda: list(LATE_L2_GRID), metadata={
        "help": "late head: L2 strengths towards plain log-linear fusion, the best by 5-fold cross-validation on "
                "the validation products"})
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
    return state_fingerprint(["text", model.text_branch.init_arguments()], model.text_branch.state_dict())


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
    """Fit ``model``'s head in place: the late head on ``splits["val"]`` (``fit_late_head``), the concat head as
    ``train_concat_head`` does."""
    if model.head_kind == "late":
        return fit_late_head(model, splits["val"], config)
    return train_concat_head(model, splits, config, context, cache=cache)


def branch_log_proba(model: FusionClassifier, split: Marketplace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each branch's calibrated log-probabilities [n, n_classes] for the products of ``split`` that have photos
    (their photos' probabilities averaged), and those products' label indices."""
    images = SplitImages.from_split(split, "validation")
    photo_proba = np.concatenate([model.image_branch.predict_proba(images=chunk)
                                  for chunk in image_chunks(split.image_store, images.image_ids,
                                                            desc="image branch (validation)")])
    owners = np.unique(images.image_products, return_inverse=True)[1]
    order = np.unique(images.image_products)
    image_proba = mean_by_listing(photo_proba, owners, len(order))
    text_proba = model.text_branch.predict_proba(texts=split.product_texts(order))
    labels = split.products.set_index("product_id").loc[order, "label"].map(split.classes.index).to_numpy(np.int64)
    return np.log(np.clip(image_proba, 1e-12, None)), np.log(np.clip(text_proba, 1e-12, None)), labels


def _fit_late(image_log: torch.Tensor, text_log: torch.Tensor, labels: torch.Tensor, l2: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The late head's (image weight, text weight, bias) minimising NLL + l2 * distance from (1, 1, 0)."""
    n_classes = image_log.shape[1]
    weights = torch.ones(2, n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = weights[0] * image_log + weights[1] * text_log + bias
        loss = (nn.functional.cross_entropy(logits, labels)
                + l2 * (((weights - 1) ** 2).sum() + (bias ** 2).sum()))
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights[0].detach(), weights[1].detach(), bias.detach()


def _late_nll(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], image_log: torch.Tensor,
              text_log: torch.Tensor, labels: torch.Tensor) -> float:
    image_weight, text_weight, bias = parts
    return float(nn.functional.cross_entropy(image_weight * image_log + text_weight * text_log + bias, labels))


def fit_late_head(model: FusionClassifier, val: Marketplace, config: FusionTrainConfig) -> TrainResult:
    """Fit the late head on the validation products with photos, its L2 strength by cross-validation there."""
    started = time.perf_counter()
    image_np, text_np, labels_np = branch_log_proba(model, val)
    image_log, text_log = torch.as_tensor(image_np), torch.as_tensor(text_np)
    labels = torch.as_tensor(labels_np.copy())
    # As many folds as the rarest class present allows: a class with one validation product leaves no fold to
    # score on, and the strongest L2 is taken instead.
    n_folds = min(_LATE_FOLDS, int(np.unique(labels_np, return_counts=True)[1].min()))
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=config.seed) if n_folds >= 2 else None
    cross_validated: dict[str, float] = {}
    for l2 in config.late_l2:
        if folds is None:
            cross_validated[str(l2)] = float("nan")
            continue
        losses = []
        for fit_rows, held_rows in folds.split(image_np, labels_np):
            fitted = _fit_late(image_log[fit_rows], text_log[fit_rows], labels[fit_rows], l2)
            losses.append(_late_nll(fitted, image_log[held_rows], text_log[held_rows], labels[held_rows]))
        cross_validated[str(l2)] = float(np.mean(losses))
    best = min(config.late_l2, key=lambda l2: (np.nan_to_num(cross_validated[str(l2)], nan=np.inf), -l2))
    image_weight, text_weight, bias = _fit_late(image_log, text_log, labels, best)
    with torch.no_grad():
        model.image_weight.copy_(image_weight)
        model.text_weight.copy_(text_weight)
        model.bias.copy_(bias)
    plain = (torch.ones_like(bias), torch.ones_like(bias), torch.zeros_like(bias))
    fused = torch.softmax(model.late_logits(image_log.float(), text_log.float()), dim=1).detach().numpy()
    model.eval()
    return TrainResult(metrics={
        "late_head": {
            "validation_products": len(labels_np),
            "l2": best,
            "cross_validated_nll_by_l2": cross_validated,
            "validation_nll": {"plain_log_linear": _late_nll(plain, image_log, text_log, labels),
                               "fitted": _late_nll((image_weight, text_weight, bias), image_log, text_log, labels)},
            "validation_accuracy": {name: evaluate(labels_np, proba, model.classes)["accuracy"]
                                    for name, proba in (("image", np.exp(image_np)), ("text", np.exp(text_np)),
                                                        ("fused", fused))},
            "mean_weights": {"image": float(image_weight.mean()), "text": float(text_weight.mean())},
            "seconds": round(time.perf_counter() - started, 1),
        }})


def train_concat_head(model: FusionClassifier, splits: dict[str, Marketplace], config: FusionTrainConfig,
                      context: DistributedContext | None = None, *, cache: FeatureCache | None = None) -> TrainResult:
    """Train the concat head (and any unfrozen branch) in place, one sample per photo with its product's text.

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
