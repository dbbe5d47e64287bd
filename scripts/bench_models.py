"""Benchmark every model family on several product splits: HOG-SVM, the image model on a pretrained trunk, the text
CNN, and their fusion (late head; concat head frozen and with a branch unfrozen), mean ± sd over the splits.

Every model is trained through the package's own trainers with their defaults (what the train_* scripts do) on each
split's training products (validation products for early stopping, calibration and the late head) and scored on
the split's held-out test products with ``evaluate_model``: photo models per product with photos (photos'
probabilities averaged), text and fusion models on every test product (a product without photos by its text).
Train seconds include feature extraction and caching; calibration error (ECE, 15 bins) is per product. The
frozen trunk's outputs (plain photo and augmented views, which depend on the photo alone) are cached once per
run and shared by the splits, so an image model's seconds are the full cost only for the first split that
trains one; later splits pay for the photos not yet seen.

Each finished (seed, row) result goes to a journal beside the report (bench_models.jsonl), and the trained image
and text branches of each split are kept under the cache folder, so ``--resume`` trains only what is missing.

    python scripts/bench_models.py                               # ../shared/marketplace, seeds 0 1 2
    python scripts/bench_models.py --seeds 0 --rows hog-svm text-cnn
    python scripts/bench_models.py --seeds 0 1 2 3 --resume       # adds seed 3 to an earlier run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from marketplace_reco.data import Marketplace
from marketplace_reco.models import FusionClassifier, HogSvmClassifier, ImageClassifier, TextCNN, load_model
from marketplace_reco.settings import cache_dir, reports_dir
from marketplace_reco.training import evaluate_model, fusion, hog_svm, image_classifier, text_cnn, word2vec
from marketplace_reco.training.benchmarks import (
    BenchmarkReport,
    ResultJournal,
    add_export_arguments,
    load_export,
    markdown_table,
)
from marketplace_reco.training.distributed import init_distributed
from marketplace_reco.training.feature_cache import FeatureCache
from marketplace_reco.training.runs import RUN_ERRORS, split_summary

#: row -> what it is, for the report.
ROWS = {
    "hog-svm": "HOG (+ colour, LBP) features, linear SVM, C chosen on validation",
    "image": "image classifier on the pretrained trunk (package defaults: see --image-backbone)",
    "text-cnn": "word2vec + text CNN, frozen embedding, 5 members (package defaults)",
    "fusion-late": "late head: per-class weights of both branches' calibrated log-probabilities, fitted on validation",
    "fusion-concat": "concat head over both branches' features, frozen branches, trained on the training products",
    "fusion-concat-text": "concat head with the text CNN unfrozen (fine-tuned with the head)",
    "fusion-concat-image": "concat head with the image branch's trainable blocks unfrozen",
}
FUSION_ROWS = {"fusion-late": ("late", []), "fusion-concat": ("concat", []),
               "fusion-concat-text": ("concat", ["text"]), "fusion-concat-image": ("concat", ["image"])}
SPLIT = (0.8, 0.1, 0.1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    add_export_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one product split (and training seed) per value (default: %(default)s)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS),
                        help="models to run (default: all)")
    parser.add_argument("--image-backbone", default="tf_efficientnet_lite0.in1k",
                        help="timm backbone with a pretrained tag (default: %(default)s; the offline cache of "
                             "../shared/pretrained provides it here)")
    parser.add_argument("--image-augmented-views", type=int,
                        default=image_classifier.ImageTrainConfig.augmented_views,
                        help="cached augmented views per training photo (default: the package's, %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report (default: <reports folder>/bench_models.md); the journal is beside it (.jsonl)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the journal's results and the kept branches instead of starting afresh")
    return parser


def _timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def _scores(metrics: dict[str, Any], seconds: float) -> dict[str, float]:
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"],
            "seconds": seconds, "products": metrics["n_samples"]}


class _Branches:
    """The image and text branches of one split: trained once, kept as checkpoints, loaded again on resume."""

    def __init__(self, folder: Path, splits: dict[str, Marketplace], args: argparse.Namespace,
                 trunk_outputs: FeatureCache) -> None:
        self.folder = folder
        self.splits = splits
        self.args = args
        self.trunk_outputs = trunk_outputs
        #: The branches this run has trained and saved.
        self.trained: set[str] = set()
        self.seconds: dict[str, float] = {}

    def _kept(self, name: str) -> Any | None:
        """The branch trained earlier in this run (or, with --resume, in an earlier run), reloaded."""
        path = self.folder / name
        if name in self.trained or (self.args.resume and (path / "config.json").is_file()):
            return load_model(str(path))  # with its source recorded, as a fusion model wants
        return None

    def _keep(self, model: Any, name: str) -> Any:
        model.data_summary = split_summary(self.splits, self.args.seed)
        model.save_pretrained(self.folder / name)
        self.trained.add(name)
        return self._kept(name)

    def image(self) -> ImageClassifier:
        kept = self._kept("image")
        if kept is not None:
            return kept
        torch.manual_seed(self.args.seed)
        model = ImageClassifier(self.splits["train"].classes, backbone=self.args.image_backbone, pretrained=True)
        _, self.seconds["image"] = _timed(image_classifier.train, model, self.splits,
                                          image_classifier.ImageTrainConfig(
                                              seed=self.args.seed, augmented_views=self.args.image_augmented_views),
                                          cache=self.trunk_outputs)
        return self._keep(model, "image")

    def text(self) -> TextCNN:
        kept = self._kept("text-cnn")
        if kept is not None:
            return kept
        started = time.perf_counter()
        embedding, _ = word2vec.train(self.splits, word2vec.Word2VecTrainConfig(seed=self.args.seed))
        torch.manual_seed(self.args.seed)
        model = TextCNN.from_word2vec(embedding, self.splits["train"].classes)
        text_cnn.train(model, self.splits, text_cnn.TextCNNTrainConfig(seed=self.args.seed))
        self.seconds["text-cnn"] = time.perf_counter() - started
        return self._keep(model, "text-cnn")


def _run_row(row: str, splits: dict[str, Marketplace], branches: _Branches, args: argparse.Namespace
             ) -> dict[str, float]:
    test = splits["test"]
    if row == "hog-svm":
        model = HogSvmClassifier(splits["train"].classes, random_state=args.seed)
        _, seconds = _timed(hog_svm.train, model, splits, hog_svm.HogSvmTrainConfig(C_values=[0.0003, 0.001, 0.003]))
        return _scores(evaluate_model(model, test), seconds)
    if row in ("image", "text-cnn"):
        model = branches.image() if row == "image" else branches.text()
        return _scores(evaluate_model(model, test), branches.seconds.get(row, float("nan")))
    head, unfrozen = FUSION_ROWS[row]
    torch.manual_seed(args.seed)
    model = FusionClassifier.from_branches(branches.image(), branches.text(), head=head, unfrozen=unfrozen)
    _, seconds = _timed(fusion.train, model, splits, fusion.FusionTrainConfig(seed=args.seed))
    metrics = evaluate_model(model, test)
    return {**_scores(metrics, seconds), "accuracy_with_photos": metrics["with_photos"]["accuracy"]}


def _mean_sd(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _report_body(results: dict[str, dict[int, dict[str, float]]], args: argparse.Namespace, source: str,
                 reused: int) -> str:
    seeds = args.seeds
    rows = []
    for row, by_seed in results.items():
        runs = [by_seed[seed] for seed in seeds if seed in by_seed]
        rows.append([row, _mean_sd([r["accuracy"] for r in runs], 4), _mean_sd([r["macro_f1"] for r in runs], 4),
                     _mean_sd([r["ece"] for r in runs], 3), _mean_sd([r["seconds"] for r in runs], 0),
                     " ".join(f"{r['accuracy']:.4f}" for r in runs), str(int(runs[0]["products"]))])
    lines = [
        f"Data: {source}; split by product {SPLIT} (stratified), seeds {' '.join(map(str, seeds))}; image backbone "
        f"`{args.image_backbone}` (pretrained), {args.image_augmented_views} cached augmented views per training "
        "photo. Accuracy, macro-F1 and ECE per held-out test product, mean ± "
        "standard deviation over the seeds; `products` is the first seed's number of scored test products.",
        "",
        markdown_table(["model", "accuracy", "macro-F1", "ECE", "train s", "accuracy per seed", "products"], rows),
        "",
        *[f"- `{row}`: {ROWS[row]}" for row in results],
        "",
        "Train seconds include feature extraction and caching. The frozen trunk's outputs (plain photo and "
        "augmented views, which depend on the photo alone) are cached once per run and shared by the splits: the "
        "first split that trains an image model in a run pays for the trunk over its photos in full, later ones "
        "only for photos not yet seen.",
    ]
    text, fused = results.get("text-cnn", {}), results.get("fusion-late", {})
    common = [seed for seed in seeds if seed in text and seed in fused]
    if common:
        gains = [fused[seed]["accuracy"] - text[seed]["accuracy"] for seed in common]
        lines += ["", f"Late fusion against the text CNN it is built from: {statistics.mean(gains) * 100:+.2f} points "
                      f"on average, ahead on {sum(g > 0 for g in gains)} of {len(gains)} splits "
                      f"({' '.join(f'{g * 100:+.2f}' for g in gains)})."]
    if reused:
        lines += ["", f"{reused} of the (seed, row) results were taken from the journal (`--resume`), their seconds "
                      "from the run that made them."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    init_distributed()  # one process; sets torch's threads from the cores (or OMP_NUM_THREADS)
    report = BenchmarkReport("All models on the real listings", args.output or reports_dir() / "bench_models.md",
                             argv)
    results: dict[str, dict[int, dict[str, float]]] = {}
    reused = 0
    try:
        marketplace, source = load_export(args)
        journal = ResultJournal(report.path.with_suffix(".jsonl"),
                                {"data": source, "fractions": list(SPLIT), "image_backbone": args.image_backbone,
                                 "image_augmented_views": args.image_augmented_views},
                                args.resume)
        with FeatureCache() as trunk_outputs:
            for seed in args.seeds:
                args.seed = seed
                splits = marketplace.split(SPLIT, seed=seed)
                branches = _Branches(cache_dir() / "bench_models" / f"seed{seed}", splits, args, trunk_outputs)
                for row in args.rows:
                    scored = journal.get(seed, row)
                    if scored is None:
                        scored = {row: _run_row(row, splits, branches, args)}
                        journal.add(seed, row, scored)
                    else:
                        reused += 1
                    results.setdefault(row, {})[seed] = scored[row]
                    print(f"seed {seed} {row}: accuracy {scored[row]['accuracy']:.4f}, ECE "
                          f"{scored[row]['ece']:.3f}, {scored[row]['seconds']:.0f}s", flush=True)
    except RUN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    body = _report_body(results, args, source, reused)
    print(body)
    report.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
