"""Benchmark the HOG-SVM baseline on the real marketplace data: held-out accuracy, macro-F1 and timings.

By default the export in ../shared/marketplace is imported into a temporary SQLite database with the
project's importer and split by product (80/10/10, stratified). Each configuration extracts its own
features and trains one SVM per C value, keeping the best on the validation products; figures are for
the held-out test products (a product's photos' probabilities averaged), with per-photo figures beside.

Example:
    python scripts/bench_hog_svm.py                       # writes reports/bench_hog_svm.md
    python scripts/bench_hog_svm.py --configs reference --C 0.0003
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from marketplace_reco.models import HogSvmClassifier
from marketplace_reco.settings import reports_dir
from marketplace_reco.training import evaluate_model, hog_svm
from marketplace_reco.training.benchmarks import BenchmarkReport, add_export_arguments, load_export, markdown_table
from marketplace_reco.training.runs import RUN_ERRORS

# name -> (what the feature vector holds, HogSvmClassifier hyperparameters)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "reference": ("HOG 9 orientations, 16-px cells, 128x128 grey",
                  {"pixels_per_cell": [16], "colour_bins": 0, "lbp_grid": 0}),
    "default": ("the model's defaults: reference HOG + sqrt HSV histogram 8x8x8 + LBP histograms (whole, 2x2 grid)",
                {}),
}
COLUMNS = ("config", "features", "n_features", "best C", "accuracy", "macro-F1", "photo acc.", "photo macro-F1",
           "feature s", "train s", "train prod./photos", "test prod./photos")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train and evaluate HOG-SVM configurations on the real marketplace data (split by product) "
                    "and report held-out accuracy, macro-F1, feature-extraction and training time.",
    )
    add_export_arguments(parser)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                        help="configurations to run (default: all)")
    parser.add_argument("--C", type=float, nargs="+", default=[0.0001, 0.0003, 0.001], dest="C_values",
                        help="SVM C values tried per configuration, best on validation kept (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the product split (default: %(default)s)")
    parser.add_argument("--report", type=Path, default=None,
                        help="markdown report to write (default: <reports folder>/bench_hog_svm.md)")
    return parser


def _row(name: str, metrics: dict[str, Any], n_features: int, sizes: dict[str, tuple[int, int]]) -> list[str]:
    best_c = max(metrics["validation_macro_f1_by_C"].items(), key=lambda item: item[1])[0]
    timing = metrics["timing_s"]
    return [name, CONFIGS[name][0], str(n_features), best_c, f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}",
            f"{metrics['per_image']['accuracy']:.4f}", f"{metrics['per_image']['macro_f1']:.4f}",
            f"{timing['feature_extraction']:.1f}", f"{timing['training']:.1f}",
            "{}/{}".format(*sizes["train"]), "{}/{}".format(*sizes["test"])]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    report = BenchmarkReport("HOG-SVM benchmark on the real marketplace data",
                             args.report or reports_dir() / "bench_hog_svm.md", argv)
    try:
        marketplace, described = load_export(args)
        splits = marketplace.split((0.8, 0.1, 0.1), seed=args.seed)
        sizes = {name: (len(split.products), len(split.images_frame())) for name, split in splits.items()}
        rows, details = [], []
        for name in args.configs:
            model = HogSvmClassifier(marketplace.classes, **CONFIGS[name][1])
            result = hog_svm.train(model, splits, hog_svm.HogSvmTrainConfig(C_values=args.C_values))
            metrics = {**evaluate_model(model, splits["test"]), **result.metrics}
            rows.append(_row(name, metrics, model.n_features, sizes))
            details.append(f"- `{name}`: validation product macro-F1 by C "
                           f"{metrics['validation_macro_f1_by_C']}, softmax temperature {metrics['temperature']:.3g}")
            print(markdown_table(COLUMNS, rows), flush=True)
    except RUN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report.write(
        f"Data: {described}, split by product 80/10/10 (stratified, seed {args.seed}). "
        "accuracy and macro-F1 are per held-out test product (its photos' probabilities averaged); "
        "photo columns score each test photo alone. Feature seconds cover the training and validation photos; "
        "train seconds cover every C tried.\n\n"
        f"{markdown_table(COLUMNS, rows)}\n\n" + "\n".join(details)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
