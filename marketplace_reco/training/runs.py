"""A training run from start to finish, the same for every model: what the ``scripts/train_*.py`` call.

A script parses its arguments (data and output options from here, its model's options, its training config
through ``add_config_arguments``) and hands ``run_training`` a function that builds and trains the model. The run
starts the process group under torchrun, loads and splits the data by product, times the training, evaluates
the held-out products on rank 0 (``evaluation.evaluate_model``), and ``finish_run`` saves the checkpoint with its
metrics, plots and history (and pushes it to a hub if asked). Every error the data or a checkpoint can raise
ends the script with one line saying what and where, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import logging
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..data.dataset import Marketplace, load_marketplace
from ..data.errors import DataError
from ..models import CheckpointMixin, push_checkpoint
from ..models.errors import CheckpointError
from ..settings import checkpoints_dir
from .distributed import DistributedContext, init_distributed
from .evaluation import evaluate_model
from .feature_cache import FeatureCacheError
from .plots import plot_confusion_matrix, plot_training_curves

logger = logging.getLogger(__name__)

Config = TypeVar("Config")
#: The errors a run reports in one line: bad data, an unusable checkpoint, bad settings.
RUN_ERRORS = (DataError, CheckpointError, FeatureCacheError, ValueError)


@dataclass
class TrainResult:
    """What a family's ``train`` hands back; the model it was given holds the trained weights."""

    #: One row per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``, ...); empty without epochs.
    history: list[dict[str, float]] = field(default_factory=list)
    #: What the run learned about itself (best epoch, validation figures, timings): merged into the metrics.
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Extra pictures for people: file name -> function writing it to the given path.
    figures: dict[str, Callable[[Path], Any]] = field(default_factory=dict)


# ---- arguments ---------------------------------------------------------------------------------------------
def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the listings come from and how they are split (by product, stratified)."""
    group = parser.add_argument_group("data")
    group.add_argument("--db-url", default=None,
                       help="SQLAlchemy URL of the products/images tables (default: $MARKETPLACE_DB_URL or the "
                            "embedded SQLite sample, data/marketplace.db)")
    group.add_argument("--images", default=None,
                       help="image location: a folder or s3://bucket/prefix (default: $MARKETPLACE_IMAGES or "
                            "data/images)")
    group.add_argument("--val-fraction", type=float, default=0.1, help="share of products for validation")
    group.add_argument("--test-fraction", type=float, default=0.1, help="share of products held out for the final test")
    group.add_argument("--seed", type=int, default=0, help="seed of the split and of training")


def add_output_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """Where the checkpoint goes."""
    group = parser.add_argument_group("output")
    group.add_argument("--name", default=default_name,
                       help=f"checkpoint name under the checkpoints folder (default: {default_name})")
    group.add_argument("--output", type=Path, default=None,
                       help="explicit checkpoint folder (default: <checkpoints folder>/<name>)")
    group.add_argument("--push-to", default=None,
                       help="after saving, also push to a hub: a folder, s3://bucket/prefix/name or a Hugging Face "
                            "repo id")
    group.add_argument("--revision", default=None, help="revision (branch or version) to push under")


def default_arguments(function: Callable[..., Any]) -> dict[str, Any]:
    """``function``'s parameters and their defaults (of a model's ``__init__``: its script's model options)."""
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()}


#: Help and extra flags of the options every torch family's training config has (a field's metadata may add more).
COMMON_OPTIONS: dict[str, dict[str, Any]] = {
    "epochs": {"help": "maximum epochs; also the length of the learning-rate schedule"},
    "batch_size": {"help": "training samples per batch and process"},
    "learning_rate": {"flags": ["--lr"], "help": "peak learning rate"},
    "weight_decay": {"help": "AdamW weight decay"},
    "patience": {"help": "stop after this many epochs without a better validation figure"},
}


def _option_type(annotation: Any) -> tuple[Any, bool]:
    """The argparse type of a config field's annotation, and whether it takes a list."""
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) in (list, tuple):
        return typing.get_args(hint)[0], True
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, title: str, *,
                         defaults: Any | None = None, shared: Sequence[str] = ("seed",)) -> argparse._ArgumentGroup:
    """One option per field of the dataclass ``config_class`` (``learning_rate`` -> ``--learning-rate``, plus the
    ``flags`` of the field's metadata), with the field's default (or ``defaults``'s value) and its ``help`` (the
    field's metadata, or ``COMMON_OPTIONS`` for the usual ones).

    The ``shared`` fields come from options the parser already has (``--seed``, of the data arguments).
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(config_class)
    defaults = defaults if defaults is not None else config_class()
    for spec in dataclasses.fields(config_class):
        if spec.name in shared:
            continue
        default = getattr(defaults, spec.name)
        metadata = {**COMMON_OPTIONS.get(spec.name, {}), **spec.metadata}
        flags = [f"--{spec.name.replace('_', '-')}", *metadata.get("flags", [])]
        help_text = metadata.get("help", "") + (" (default: %(default)s)" if default is not None else "")
        kind, many = _option_type(hints[spec.name])
        if kind is bool:
            group.add_argument(*flags, dest=spec.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            group.add_argument(*flags, dest=spec.name, type=kind, nargs="+" if many else None,
                               default=list(default) if many and default is not None else default,
                               metavar=metadata.get("metavar"), choices=metadata.get("choices"), help=help_text)
    return group


def config_from_arguments(config_class: type[Config], args: argparse.Namespace) -> Config:
    """The dataclass ``config_class`` filled from the parsed options of the same names."""
    return config_class(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(config_class)})


# ---- data --------------------------------------------------------------------------------------------------
def load_splits(args: argparse.Namespace) -> dict[str, Marketplace]:
    """Load the marketplace named by the data arguments and split it by product."""
    marketplace = load_marketplace(args.db_url, args.images)
    train_fraction = 1.0 - args.val_fraction - args.test_fraction
    return marketplace.split((train_fraction, args.val_fraction, args.test_fraction), seed=args.seed)


def products_fingerprint(product_ids: Iterable[Any]) -> str:
    """A hash of a set of products, to check later that two models were trained on the same ones."""
    joined = "\n".join(sorted(str(product_id) for product_id in product_ids))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]


def split_summary(splits: dict[str, Marketplace], seed: int) -> dict[str, Any]:
    """The data summary a checkpoint records, with a fingerprint of its training products."""
    return {"split": "by product, stratified on the label", "seed": seed, **splits["train"].summary(),
            "sizes": {name: len(split.products) for name, split in splits.items()},
            "train_products": products_fingerprint(splits["train"].products["product_id"])}


def check_same_split(model: CheckpointMixin, splits: dict[str, Marketplace], role: str) -> None:
    """Refuse a model trained on other products than this run's training split: it may have learned from this
    run's validation or test listings, and its held-out figures would lie."""
    recorded = model.data_summary.get("train_products")
    if recorded != products_fingerprint(splits["train"].products["product_id"]):
        where = model.source.get("folder", "the in-memory model")
        raise CheckpointError(
            f"the {role} {where} was trained on a different set of products (fingerprint {recorded!r}) than this "
            "run's training split, so it may have seen this run's validation or test listings; train it with the "
            "same data and split arguments (--db-url, --images, --val-fraction, --test-fraction, --seed)"
        )


# ---- the run -----------------------------------------------------------------------------------------------
def output_folder(args: argparse.Namespace) -> Path:
    """The checkpoint folder chosen by the output arguments."""
    return args.output if args.output is not None else checkpoints_dir() / args.name


def run_training(args: argparse.Namespace,
                 fit: Callable[[dict[str, Marketplace], DistributedContext], tuple[CheckpointMixin, TrainResult]],
                 ) -> int:
    """Run ``fit(splits, context)`` (build the model and train it) on the data the arguments name, evaluate the
    held-out test products and save the checkpoint; the script's exit status (1 after a one-line error)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    context = init_distributed()
    try:
        splits = load_splits(args)
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        model, result = fit(splits, context)
        training_s = time.perf_counter() - started
        if context.is_main:
            metrics = evaluate_model(model, splits["test"]) if model.input_kind else {}
            metrics.update(result.metrics, training_s=round(training_s, 1), processes=context.world_size)
            finish_run(model, output_folder(args), metrics=metrics,
                       data_summary={**model.data_summary, **split_summary(splits, args.seed)},
                       history=result.history, figures=result.figures, push_to=args.push_to, revision=args.revision)
    except RUN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        context.close()
    return 0


def finish_run(
    model: CheckpointMixin,
    folder: Path,
    *,
    metrics: dict[str, Any],
    data_summary: dict[str, Any],
    history: Sequence[dict[str, float]] = (),
    figures: dict[str, Callable[[Path], Any]] | None = None,
    push_to: str | None = None,
    revision: str | None = None,
) -> Path:
    """Record metrics in the model, save the checkpoint, draw its pictures and optionally push it."""
    model.metrics = metrics
    model.data_summary = data_summary
    if isinstance(model, torch.nn.Module):
        model.cpu()
    model.save_pretrained(folder)
    classes = model.config.get("classes")
    title = f"{model.model_type} ({folder.name})"
    if classes and "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics, classes, folder / "confusion_matrix.png", title)
    if history:
        plot_training_curves(history, folder / "training_curves.png", title)
        (folder / "history.json").write_text(json.dumps(list(history), indent=2), encoding="utf-8")
    for name, draw in (figures or {}).items():
        draw(folder / name)
    logger.info("saved %s to %s", model.model_type, folder)
    if push_to:
        push_checkpoint(folder, push_to, revision=revision)
    print(format_metrics(metrics, title))
    print(f"checkpoint: {folder}")
    return folder


def format_metrics(metrics: dict[str, Any], title: str) -> str:
    """A short plain-text table of the headline metrics."""
    if "accuracy" not in metrics:
        return title
    lines = [title, f"  {'split':<10}{metrics.get('split', 'test')}", f"  {'samples':<10}{metrics.get('n_samples')}",
             f"  {'accuracy':<10}{metrics['accuracy']:.4f}", f"  {'macro-F1':<10}{metrics['macro_f1']:.4f}"]
    return "\n".join(lines)
