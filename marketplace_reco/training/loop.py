"""The torch training loop shared by every torch model: early stopping, LR schedule, progress, best state kept.

``fit`` works the same in one process and under torchrun: pass a DDP-wrapped model (``distributed.wrap_model``)
and loaders whose samplers come from ``distributed.shard_sampler``; losses and accuracies are summed over
all ranks before any decision, so every rank stops at the same epoch and restores the same best state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from .. import _progress
from ..models.errors import ModelConfigError
from .distributed import DistributedContext, all_reduce_sum, single_process_context, unwrap_model

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Monitor = Literal["val_loss", "val_accuracy"]


@dataclass
class FitResult:
    """What ``fit`` leaves behind; the model itself already holds ``best_state``."""

    #: One row per epoch: epoch, train_loss, val_loss, val_accuracy, lr, seconds.
    history: list[dict[str, float]]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    #: True when patience ran out before ``epochs``.
    stopped_early: bool


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    return tuple(_to_device(item, device) for item in inputs)


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    """A batch's inputs are one tensor or a tuple of tensors (several model inputs)."""
    return model(inputs) if isinstance(inputs, torch.Tensor) else model(*inputs)


def _autocast(context: DistributedContext, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on the context's device when ``dtype`` is given (e.g. bfloat16), else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=context.device.type, dtype=dtype)


def _validate(
    model: nn.Module, loader: Iterable[Any], loss_fn: LossFn, context: DistributedContext,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy over the whole validation set (all ranks' shards together)."""
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.inference_mode():
        for inputs, targets in loader:
            targets = targets.to(context.device, non_blocking=True)
            with _autocast(context, autocast_dtype):
                logits = _forward(model, _to_device(inputs, context.device)).float()
            loss_sum += float(loss_fn(logits, targets)) * len(targets)
            correct += float((logits.argmax(dim=1) == targets).sum())
            count += len(targets)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], context)
    if count == 0:
        raise ValueError("fit: the validation loader yielded no samples; early stopping needs a validation set")
    return loss_sum / count, correct / count


def _improved(value: float, best: float, monitor: Monitor) -> bool:
    return value < best if monitor == "val_loss" else value > best


def fit(
    model: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    *,
    epochs: int,
    optimizer: Optimizer,
    scheduler: LRScheduler | ReduceLROnPlateau | None = None,
    scheduler_interval: Literal["batch", "epoch"] = "batch",
    loss_fn: LossFn = nn.functional.cross_entropy,
    patience: int = 3,
    monitor: Monitor = "val_loss",
    context: DistributedContext | None = None,
    desc: str = "training",
    accumulation_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    max_grad_norm: float | None = None,
) -> FitResult:
    """Train ``model`` for up to ``epochs``, stopping after ``patience`` epochs without a better ``monitor``.

    Batches are ``(inputs, targets)`` where ``inputs`` is a tensor or a tuple of tensors passed as
    positional arguments. ``scheduler`` steps after every batch (``"batch"``, e.g. OneCycleLR) or every
    epoch (``"epoch"``); a ``ReduceLROnPlateau`` is stepped with the monitored value. At the end the best
    epoch's weights are loaded back into the model. ``context`` (default: one process on the model's
    device) says which rank shows the progress bars.

    ``accumulation_steps`` batches add up their gradients before each optimizer step (a batch-``"batch"`` scheduler
    steps with the optimizer; under DDP the gradients are averaged across ranks only on the step's last batch);
    ``autocast_dtype`` runs forward passes and losses in mixed precision (e.g. ``torch.bfloat16``, also on CPU);
    ``max_grad_norm`` clips the gradients' global norm before each step.
    """
    if epochs < 1 or patience < 1 or accumulation_steps < 1:
        raise ValueError(f"fit: epochs, patience and accumulation_steps must be at least 1, got epochs={epochs}, "
                         f"patience={patience}, accumulation_steps={accumulation_steps}")
    context = context or single_process_context(next(model.parameters()).device)
    module = unwrap_model(model)
    # A DataLoader's sampler, or its batch sampler, may need telling the epoch (DistributedSampler does).
    samplers = [s for s in (getattr(train_loader, "sampler", None), getattr(train_loader, "batch_sampler", None))
                if hasattr(s, "set_epoch")]
    best_value = math.inf if monitor == "val_loss" else -math.inf
    best_state = {key: value.detach().clone() for key, value in module.state_dict().items()}
    best_epoch, stale = 0, 0
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        for sampler in samplers:
            sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
        model.train()
        loss_sum = count = 0.0
        bar = _progress.progress_bar(train_loader, desc=f"{desc} {epoch}/{epochs}", leave=False,
                                    disable=not context.is_main)
        n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
        optimizer.zero_grad(set_to_none=True)
        for batch_index, (inputs, targets) in enumerate(bar, start=1):
            steps_now = batch_index % accumulation_steps == 0 or batch_index == n_batches
            # Between optimizer steps DDP need not average the gradients: only the last batch's backward does.
            no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not steps_now \
                else contextlib.nullcontext()
            targets = targets.to(context.device, non_blocking=True)
            with no_sync:
                with _autocast(context, autocast_dtype):
                    loss = loss_fn(_forward(model, _to_device(inputs, context.device)).float(), targets)
                (loss / accumulation_steps).backward()
            if steps_now:
                if max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None and scheduler_interval == "batch":
                    scheduler.step()
            loss_sum += float(loss.detach()) * len(targets)
            count += len(targets)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}")
        loss_sum, count = all_reduce_sum([loss_sum, count], context)
        val_loss, val_accuracy = _validate(model, val_loader, loss_fn, context, autocast_dtype)
        monitored = val_loss if monitor == "val_loss" else val_accuracy
        if scheduler is not None and scheduler_interval == "epoch":
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(monitored)
            else:
                scheduler.step()
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(count, 1),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        if _improved(monitored, best_value, monitor):
            best_value, best_epoch, stale = monitored, epoch, 0
            best_state = {key: value.detach().clone() for key, value in module.state_dict().items()}
            mark = " *"
        else:
            stale += 1
            mark = ""
        if context.is_main:
            _progress.write(f"{desc} epoch {epoch}/{epochs}: train_loss {row['train_loss']:.4f}  "
                            f"val_loss {val_loss:.4f}  val_accuracy {val_accuracy:.4f}  lr {row['lr']:.2e}  "
                            f"{row['seconds']:.1f}s{mark}")
        if stale >= patience:
            break
    module.load_state_dict(best_state)
    return FitResult(history=history, best_epoch=best_epoch, best_state=best_state,
                     stopped_early=len(history) < epochs)


def _parameters_by_rate(model: nn.Module, learning_rate: float, part_learning_rates: Sequence[tuple[nn.Module, float]]
                        ) -> list[tuple[list[nn.Parameter], float]]:
    """The trainable parameters with their peak LR: each part's own, ``learning_rate`` for the rest (first)."""
    parts = [([p for p in part.parameters() if p.requires_grad], rate) for part, rate in part_learning_rates]
    claimed = {id(p) for params, _ in parts for p in params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    return [(rest, learning_rate), *parts]


def one_cycle_adamw(model: nn.Module, *, learning_rate: float, weight_decay: float, total_steps: int,
                    part_learning_rates: Sequence[tuple[nn.Module, float]] = ()
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW over the trainable parameters with a one-cycle LR schedule over ``total_steps`` batches.

    ``learning_rate`` is the peak LR; ``part_learning_rates`` gives parts of ``model`` (submodule, peak LR) their
    own, e.g. a pretrained backbone a smaller one than a new head. Built before any data is processed, so bad
    arguments fail at once. The fused implementation: with a cached trunk a training step is so short that the
    optimizer's per-parameter loop would take a fifth of it.
    """
    if total_steps < 1:
        raise ModelConfigError(f"a training run needs at least one step (epochs x batches), not {total_steps}")
    groups = [{"params": params, "lr": rate}
              for params, rate in _parameters_by_rate(model, learning_rate, part_learning_rates) if params]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[group["lr"] for group in groups],
                                                    total_steps=total_steps)
    return optimizer, scheduler


def warmup_linear_adamw(model: nn.Module, *, learning_rate: float, weight_decay: float, total_steps: int,
                        warmup_fraction: float = 0.1, part_learning_rates: Sequence[tuple[nn.Module, float]] = ()
                        ) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW over the trainable parameters with a linear warm-up over ``warmup_fraction`` of ``total_steps``
    optimizer steps to the peak LR, then a linear decay to 0: the usual schedule for fine-tuning a pretrained
    transformer. Biases and normalisation weights (1-D parameters) are not decayed.

    ``learning_rate`` is the peak LR; ``part_learning_rates`` gives parts of ``model`` (submodule, peak LR) their
    own, e.g. a new head a larger one than the pretrained encoder.
    """
    if total_steps < 1:
        raise ModelConfigError(f"a training run needs at least one step (epochs x batches), not {total_steps}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ModelConfigError(f"warmup_fraction must be in [0, 1), not {warmup_fraction}")
    groups = []
    for params, rate in _parameters_by_rate(model, learning_rate, part_learning_rates):
        for decay, chosen in ((weight_decay, [p for p in params if p.ndim > 1]),
                              (0.0, [p for p in params if p.ndim <= 1])):
            if chosen:
                groups.append({"params": chosen, "lr": rate, "weight_decay": decay})
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay, fused=True)
    warmup_steps = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        # The peak is the warm-up's last step; the decay reaches 0 at the last of ``total_steps``.
        return max(0.0, (total_steps - 1 - step) / max(1, total_steps - warmup_steps))

    return optimizer, LambdaLR(optimizer, factor)
