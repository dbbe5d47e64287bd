"""Benchmark every model on one product split: HOG-SVM, image classifier, text CNN and their fusion, side by side.

All four are trained on the same training products (validation products for model selection and early
stopping) and scored on the same held-out test products, through the package's own training functions:
``train_hog_svm``, ``train_image_classifier``, ``train_word2vec_on_split`` + ``train_text_cnn`` and
``train_fusion`` (built from the image and text models just trained). Accuracy and macro-F1 are per test
product: image models average the probabilities of a product's photos, the fusion model pairs each photo
with the product's text and averages likewise.

The image model is trained from scratch (no pretrained weights can be downloaded here): by default a
ResNet-10-T (timm ``resnet10t``) at 96 px, every layer trainable, with augmentation, for a fixed number
of epochs (the CPU budget, stated in the report with the measured time). A ResNet-50 needs 3.7 times the
multiply-adds at 96 px (20 times at 224 px), so on two CPU cores it would see a fraction of the epochs.

    python scripts/bench_models.py                           # real data in ../shared/marketplace
    python scripts/bench_models.py --sample                  # the embedded synthetic sample (390 products)
Exits with 1 unless fusion beats both the image and the text model on test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from marketplace_reco.data import Marketplace, load_marketplace, make_sample_marketplace
from marketplace_reco.models import FusionClassifier, HogSvmClassifier, ImageClassifier, TextCNN, load_model
from marketplace_reco.settings import reports_dir
from marketplace_reco.training import evaluate_model, fusion, hog_svm, image_classifier, text_cnn, word2vec
from marketplace_reco.training.benchmarks import BenchmarkReport, add_export_arguments, load_export, markdown_table
from marketplace_reco.training.runs import RUN_ERRORS, finish_run, split_summary

COLUMNS = ("model", "configuration", "accuracy", "macro-F1", "train s", "test products")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train HOG-SVM, image, text and fusion models on one product split (80/10/10, stratified) and "
                    "report held-out accuracy, macro-F1 and training seconds side by side.",
    )
    source = add_export_arguments(parser)
    source.add_argument("--sample", action="store_true",
                        help="generate the embedded synthetic sample into a temporary folder and use it instead")
    source.add_argument("--sample-products", type=int, default=390, help="products of --sample (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of training (default: %(default)s)")
    group = parser.add_argument_group("image model (from scratch)")
    group.add_argument("--image-backbone", default="resnet10t", help="timm backbone (default: %(default)s)")
    group.add_argument("--image-size", type=int, default=96, help="photo size in pixels (default: %(default)s)")
    group.add_argument("--image-epochs", type=int, default=8,
                       help="epochs: the image model's CPU budget (default: %(default)s)")
    group.add_argument("--image-lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    group.add_argument("--image-batch-size", type=int, default=64, help="photos per batch (default: %(default)s)")
    group = parser.add_argument_group("other models")
    group.add_argument("--hog-C", type=float, nargs="+", default=[0.0003, 0.001, 0.003], dest="hog_C",
                       help="SVM C values, best on validation kept (default: %(default)s)")
    group.add_argument("--text-epochs", type=int, default=15, help="text CNN epochs (default: %(default)s)")
    group.add_argument("--fusion-epochs", type=int, default=30, help="fusion head epochs (default: %(default)s)")
    parser.add_argument("--report", type=Path, default=None,
                        help="markdown report to write (default: <reports folder>/bench_models.md, or "
                             "bench_models_sample.md with --sample)")
    parser.add_argument("--save-to", type=Path, default=None, metavar="FOLDER",
                        help="also save the four trained models as checkpoints under FOLDER (hog-svm, "
                             "image-classifier, text-cnn, fusion), e.g. to serve them or to retrain the fusion "
                             "head with scripts/train_combined.py --db-url ... on the same split")
    return parser


def _open(args: argparse.Namespace, tmp: Path) -> tuple[Marketplace, str]:
    """The marketplace named by the arguments, and how the report describes it."""
    if args.sample:
        db_url, images = f"sqlite:///{tmp / 'sample.db'}", str(tmp / "images")
        make_sample_marketplace(db_url, images, n_products=args.sample_products, seed=args.seed)
        return load_marketplace(db_url, images), f"embedded synthetic sample ({args.sample_products} products)"
    return load_export(args)


def _timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def _row(name: str, configuration: str, metrics: dict[str, Any], seconds: float) -> list[str]:
    return [name, configuration, f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}", f"{seconds:.0f}",
            str(metrics["n_samples"])]


def _benchmark(args: argparse.Namespace, splits: dict[str, Marketplace]) -> tuple[list[list[str]], dict[str, float]]:
    train, test = splits["train"], splits["test"]
    rows: list[list[str]] = []
    accuracy: dict[str, float] = {}
    # What the training scripts record, so train_combined.py accepts saved branches for this split.
    data_summary = split_summary(splits, args.seed)

    def save(model: Any, name: str, metrics: dict[str, Any], history: list[dict[str, float]] | None = None) -> None:
        if args.save_to is not None:
            finish_run(model, args.save_to / name, metrics=metrics, data_summary=data_summary, history=history or [])

    hog = HogSvmClassifier(train.classes)
    result, seconds = _timed(hog_svm.train, hog, splits, hog_svm.HogSvmTrainConfig(C_values=args.hog_C))
    metrics = {**evaluate_model(hog, test), **result.metrics}
    rows.append(_row("HOG-SVM", f"HOG on 128 px grey, linear SVM, C in {args.hog_C}", metrics, seconds))
    save(hog, "hog-svm", metrics)
    print(markdown_table(COLUMNS, rows), flush=True)

    torch.manual_seed(args.seed)
    image = ImageClassifier(train.classes, backbone=args.image_backbone, trainable_blocks="all",
                            preprocessing={"image_size": args.image_size}, pretrained=False)
    config = image_classifier.ImageTrainConfig(epochs=args.image_epochs, batch_size=args.image_batch_size,
                                               learning_rate=args.image_lr, patience=args.image_epochs, augment=True,
                                               seed=args.seed)
    result, seconds = _timed(image_classifier.train, image, splits, config)
    metrics = evaluate_model(image, test)
    accuracy["image"] = metrics["accuracy"]
    save(image, "image-classifier", metrics, result.history)
    rows.append(_row("image", f"{args.image_backbone} from scratch, all layers, {args.image_size} px, augmented, "
                              f"{args.image_epochs} epochs", metrics, seconds))
    print(markdown_table(COLUMNS, rows), flush=True)

    started = time.perf_counter()
    embedding, _ = word2vec.train(splits, word2vec.Word2VecTrainConfig(seed=args.seed))
    torch.manual_seed(args.seed)
    text = TextCNN.from_word2vec(embedding, train.classes)
    result = text_cnn.train(text, splits, text_cnn.TextCNNTrainConfig(epochs=args.text_epochs, seed=args.seed))
    seconds = time.perf_counter() - started
    # The same products as the photo-based models: those with at least one photo.
    with_photos = test.subset(test.products.loc[test.products["image_ids"].map(len) > 0, "product_id"])
    metrics = evaluate_model(text, with_photos)
    accuracy["text"] = metrics["accuracy"]
    save(text, "text-cnn", metrics, result.history)
    rows.append(_row("text", f"word2vec + text CNN, {args.text_epochs} epochs", metrics, seconds))
    print(markdown_table(COLUMNS, rows), flush=True)

    if args.save_to is not None:  # from the saved checkpoints, so the fusion model records its branches' origin
        image, text = (load_model(str(args.save_to / name)) for name in ("image-classifier", "text-cnn"))
    torch.manual_seed(args.seed)
    combined = FusionClassifier.from_branches(image, text)
    result, seconds = _timed(fusion.train, combined, splits,
                             fusion.FusionTrainConfig(epochs=args.fusion_epochs, seed=args.seed))
    metrics = evaluate_model(combined, test)
    accuracy["fusion"] = metrics["accuracy"]
    save(combined, "fusion", metrics, result.history)
    rows.append(_row("fusion", "image + text features, frozen branches (cached), new head", metrics, seconds))
    print(markdown_table(COLUMNS, rows), flush=True)
    return rows, accuracy


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report = BenchmarkReport("All models on one split", args.report or reports_dir() / (
        "bench_models_sample.md" if args.sample else "bench_models.md"), argv)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        try:
            marketplace, described = _open(args, Path(tmp))
            splits = marketplace.split((0.8, 0.1, 0.1), seed=args.seed)
            rows, accuracy = _benchmark(args, splits)
        except RUN_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    beats = accuracy["fusion"] > max(accuracy["image"], accuracy["text"])
    verdict = (f"fusion {'beats' if beats else 'does NOT beat'} both single models: accuracy {accuracy['fusion']:.4f} "
               f"vs image {accuracy['image']:.4f} and text {accuracy['text']:.4f}")
    print(verdict)
    sizes = ", ".join(f"{name} {len(split.products)}" for name, split in splits.items())
    report.write(
        f"Data: {described}, split by product 80/10/10 (stratified, seed {args.seed}): {sizes} products. "
        "Accuracy and macro-F1 per held-out test product (photo models average a product's photos; fusion "
        "pairs each photo with the product's text). Train seconds include feature extraction and caching.\n\n"
        f"{markdown_table(COLUMNS, rows)}\n\n**{verdict}**\n\n"
        f"The image model is trained from scratch ({args.image_backbone}, {args.image_size} px, every layer trainable, "
        f"random crops, flips and colour jitter, {args.image_epochs} epochs: its CPU budget, measured above)."
    )
    return 0 if beats else 1


if __name__ == "__main__":
    sys.exit(main())
