"""Benchmark the image model's feature cache: seconds per epoch with and without it, same model, same photos.

A subset of the real photos (default: 512 for training, 64 for validation, from the training and validation
products of a split by product) trains the same image model (default: ResNet-50, random weights as no
pretrained ones can be downloaded here, which does not change the cost) twice from the same initial weights:
1. without the cache: every epoch runs the whole network (the frozen trunk in inference mode, channels-last);
2. with the cache: the frozen trunk runs once per photo (the warm-up), and every epoch runs only the
   trainable blocks on the cached trunk outputs.
Decoded photos are held in memory in both runs, so the epochs compare network work only. Prints a table
and the ratio of the mean epoch times, writes reports/bench_training.md and exits with 1 below --min-ratio.

    python scripts/bench_training.py                         # ../shared/marketplace, resnet50, 512 photos
    python scripts/bench_training.py --photos 256 --epochs 2 --backbone resnet18
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from marketplace_reco.data import Marketplace
from marketplace_reco.models import ImageClassifier
from marketplace_reco.models.image_classifier import DEFAULT_TRAINABLE_BLOCKS
from marketplace_reco.settings import reports_dir
from marketplace_reco.training import FeatureCache, image_classifier
from marketplace_reco.training.benchmarks import BenchmarkReport, add_export_arguments, load_export, markdown_table
from marketplace_reco.training.runs import RUN_ERRORS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Seconds per training epoch of the same image model with and without the frozen-trunk "
                    "feature cache, on a subset of the real photos; prints the ratio.",
    )
    add_export_arguments(parser)
    parser.add_argument("--photos", type=int, default=512, help="training photos (default: %(default)s)")
    parser.add_argument("--val-photos", type=int, default=64, help="validation photos (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default: %(default)s)")
    parser.add_argument("--backbone", default="resnet50", help="timm backbone (default: %(default)s)")
    parser.add_argument("--trainable-blocks", type=int, default=DEFAULT_TRAINABLE_BLOCKS,
                        help="trailing blocks of the backbone that train (default: %(default)s: ResNet-50's "
                             "layer4.2)")
    parser.add_argument("--image-size", type=int, default=224, help="photo size in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the weights (default: %(default)s)")
    # The trainable part is a whole block (ResNet-50's layer4.2: three convolutions, forward and backward): about a
    # seventh of the uncached epoch's arithmetic by count, 11-15x faster as measured here; the bar leaves room for
    # the machine's noise.
    parser.add_argument("--min-ratio", type=float, default=8.0,
                        help="exit with 1 if uncached/cached seconds per epoch is below this (default: %(default)s)")
    parser.add_argument("--report", type=Path, default=None,
                        help="markdown report to write (default: <reports folder>/bench_training.md)")
    return parser


def _photo_subset(split: Marketplace, n_photos: int, seed: int) -> Marketplace:
    """Random products of ``split`` until they hold about ``n_photos`` photos."""
    products = split.products.sample(frac=1.0, random_state=seed)
    counts = products["image_ids"].map(len).to_numpy()
    keep = products["product_id"].to_numpy()[np.cumsum(counts) <= n_photos]
    return split.subset(keep)


def _run(args: argparse.Namespace, train: Marketplace, val: Marketplace, use_cache: bool) -> dict[str, float]:
    torch.manual_seed(args.seed)  # the same initial weights for both runs
    model = ImageClassifier(train.classes, backbone=args.backbone, trainable_blocks=args.trainable_blocks,
                            preprocessing={"image_size": args.image_size}, pretrained=False)
    started = time.perf_counter()
    config = image_classifier.ImageTrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=args.epochs,
                                               augmented_views=0, cache=use_cache, seed=args.seed)
    with FeatureCache() as cache:
        result = image_classifier.train(model, {"train": train, "val": val}, config, cache=cache)
        cached_mb = (cache.nbytes_in_memory + cache.nbytes_on_disk) / 2**20
    total = time.perf_counter() - started
    epochs = [row["seconds"] for row in result.history]
    return {"setup": total - sum(epochs), "first": epochs[0], "epoch": float(np.mean(epochs)),
            "val_loss": result.history[-1]["val_loss"], "cache_mb": cached_mb}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report = BenchmarkReport("Image training: feature cache benchmark",
                             args.report or reports_dir() / "bench_training.md", argv)
    try:
        splits = load_export(args)[0].split((0.8, 0.1, 0.1), seed=args.seed)
        train = _photo_subset(splits["train"], args.photos, args.seed)
        val = _photo_subset(splits["val"], args.val_photos, args.seed)
        uncached = _run(args, train, val, use_cache=False)
        cached = _run(args, train, val, use_cache=True)
    except RUN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ratio = uncached["epoch"] / cached["epoch"]
    n_train = int(train.products["image_ids"].map(len).sum())
    n_val = int(val.products["image_ids"].map(len).sum())
    table = markdown_table(
        ["run", "setup s", "first epoch s", "mean epoch s", "final val loss", "cached MB"],
        [["without cache (decode photos)", f"{uncached['setup']:.1f}", f"{uncached['first']:.1f}",
          f"{uncached['epoch']:.1f}", f"{uncached['val_loss']:.4f}", "-"],
         ["with cache (frozen trunk once per photo)", f"{cached['setup']:.1f}", f"{cached['first']:.1f}",
          f"{cached['epoch']:.1f}", f"{cached['val_loss']:.4f}", f"{cached['cache_mb']:.0f}"]])
    verdict = f"seconds per epoch, without / with cache: {ratio:.1f}x (bar: {args.min_ratio:g}x)"
    print(table)
    print(verdict)
    report.write(
        f"Model: {args.backbone} (random weights), trainable blocks {args.trainable_blocks}, {args.image_size} px, "
        f"batch {args.batch_size}, {args.epochs} epochs per run from the same initial weights. Data: {n_train} "
        f"training and {n_val} validation photos of the real export (products of a split by product, seed "
        f"{args.seed}). Setup is decoding the photos (without cache) or decoding them and running the frozen "
        "trunk once per photo (with cache); an epoch is training plus validation.\n\n"
        f"{table}\n\n**{verdict}**"
    )
    return 0 if ratio >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
