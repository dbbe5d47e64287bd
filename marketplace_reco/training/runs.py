"""What every training script shares: data arguments, the product split, and finishing a run.

A run ends the same way for every model: metrics and data summary go into the checkpoint's config,
the checkpoint is saved (and optionally pushed to a hub), and the confusion matrix and training curves
are written as PNGs beside it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..data.dataset import Marketplace, load_marketplace
from ..data.importer import import_csv
from ..models.checkpoint import CheckpointMixin
from ..settings import checkpoints_dir
from .metrics import plot_confusion_matrix, plot_training_curves

logger = logging.getLogger(__name__)


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
    """``function``'s parameters and their defaults: the one source of a script's option defaults."""
    return {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()}


def add_training_arguments(parser: argparse.ArgumentParser, train: Callable[..., Any], *, samples: str,
                           stops_without: str) -> argparse._ArgumentGroup:
    """The optimisation options of a torch training function, with its defaults; returns the group.

    ``samples`` says what a batch holds ("texts"), ``stops_without`` what early stopping waits for
    ("a better validation accuracy").
    """
    defaults = default_arguments(train)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=defaults["epochs"],
                       help="maximum epochs; also the length of the one-cycle schedule (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                       help=f"{samples} per batch and process (default: %(default)s)")
    group.add_argument("--lr", type=float, default=defaults["learning_rate"],
                       help="peak learning rate (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=defaults["weight_decay"],
                       help="AdamW weight decay (default: %(default)s)")
    group.add_argument("--patience", type=int, default=defaults["patience"],
                       help=f"stop after this many epochs without {stops_without} (default: %(default)s)")
    return group


def add_export_arguments(parser: argparse.ArgumentParser, default_export: Path) -> argparse._ArgumentGroup:
    """Where a benchmark reads the listings: a users' CSV export folder (the default) or a database."""
    group = parser.add_argument_group("data: a CSV export (imported into a temporary SQLite database) or a database")
    group.add_argument("--data", type=Path, default=default_export,
                       help="export folder with products.csv, images.csv and images/ (default: %(default)s)")
    group.add_argument("--db-url", default=None, help="read this database instead of importing --data")
    group.add_argument("--images", default=None,
                       help="photos with --db-url: a folder or s3://bucket/prefix (default: <--data>/images)")
    return group


def load_export(args: argparse.Namespace) -> tuple[Marketplace, str]:
    """The marketplace named by the export arguments, and how a report describes it."""
    if args.db_url is not None:
        return load_marketplace(args.db_url, args.images or str(args.data / "images")), args.db_url
    # The database only lives while it is read: the listings are in memory afterwards.
    with tempfile.TemporaryDirectory(prefix="marketplace-export-") as scratch:
        db_url = f"sqlite:///{Path(scratch) / 'marketplace.db'}"
        import_csv(args.data / "products.csv", args.data / "images.csv", db_url, progress=False)
        marketplace = load_marketplace(db_url, str(args.data / "images"))
    return marketplace, f"{args.data} (imported into a temporary SQLite database)"


def load_splits(args: argparse.Namespace) -> dict[str, Marketplace]:
    """Load the marketplace named by the data arguments and split it by product."""
    marketplace = load_marketplace(args.db_url, args.images)
    train_fraction = 1.0 - args.val_fraction - args.test_fraction
    return marketplace.split((train_fraction, args.val_fraction, args.test_fraction), seed=args.seed)


def split_summary(splits: dict[str, Marketplace], seed: int) -> dict[str, Any]:
    """The data summary a checkpoint records; the fusion script compares its seed and sizes across branches."""
    return {"split": "by product, stratified on the label", "seed": seed, **splits["train"].summary(),
            "sizes": {name: len(split.products) for name, split in splits.items()}}


def output_folder(args: argparse.Namespace) -> Path:
    """The checkpoint folder chosen by the output arguments."""
    return args.output if args.output is not None else checkpoints_dir() / args.name


def finish_run(
    model: CheckpointMixin,
    folder: Path,
    *,
    metrics: dict[str, Any],
    data_summary: dict[str, Any],
    history: Sequence[dict[str, float]] | None = None,
    push_to: str | None = None,
    revision: str | None = None,
) -> Path:
    """Record metrics in the model, save the checkpoint, draw its plots and optionally push it."""
    model.metrics = metrics
    model.data_summary = data_summary
    model.save_pretrained(folder)
    classes = model.config.get("classes")
    title = f"{model.model_type} ({folder.name})"
    if classes and "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics, classes, folder / "confusion_matrix.png", title)
    if history:
        plot_training_curves(history, folder / "training_curves.png", title)
        (folder / "history.json").write_text(json.dumps(list(history), indent=2), encoding="utf-8")
    logger.info("saved %s to %s", model.model_type, folder)
    if push_to:
        from ..models.hub import push_checkpoint

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
