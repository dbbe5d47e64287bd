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
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

from marketplace_reco.data.errors import DataError
from marketplace_reco.models.errors import CheckpointError
from marketplace_reco.models.hog_svm import train_hog_svm
from marketplace_reco.settings import reports_dir
from marketplace_reco.training.runs import add_export_arguments, load_export

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "marketplace"

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
    add_export_arguments(parser, SHARED_DATA)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                        help="configurations to run (default: all)")
    parser.add_argument("--C", type=float, nargs="+", default=[0.0001, 0.0003, 0.001], dest="C_values",
                        help="SVM C values tried per configuration, best on validation kept (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the product split (default: %(default)s)")
    parser.add_argument("--report", type=Path, default=None,
                        help="markdown report to write (default: <reports folder>/bench_hog_svm.md)")
    return parser


def _row(name: str, metrics: dict[str, Any], n_features: int, summary: dict[str, Any]) -> list[str]:
    best_c = max(metrics["validation_macro_f1_by_C"].items(), key=lambda item: item[1])[0]
    timing = metrics["timing_s"]
    return [name, CONFIGS[name][0], str(n_features), best_c, f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}",
            f"{metrics['per_image']['accuracy']:.4f}", f"{metrics['per_image']['macro_f1']:.4f}",
            f"{timing['feature_extraction']:.1f}", f"{timing['training']:.1f}",
            f"{summary['train']['products']}/{summary['train']['images']}",
            f"{summary['test']['products']}/{summary['test']['images']}"]


def _table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        marketplace, described = load_export(args)
        splits = marketplace.split((0.8, 0.1, 0.1), seed=args.seed)
        rows, details = [], []
        for name in args.configs:
            run = train_hog_svm(splits, C_values=args.C_values, **CONFIGS[name][1])
            rows.append(_row(name, run.metrics, run.model.n_features, run.data_summary))
            details.append(f"- `{name}`: validation product macro-F1 by C "
                           f"{run.metrics['validation_macro_f1_by_C']}, softmax temperature "
                           f"{run.metrics['temperature']:.3g}")
            print(_table(rows), flush=True)
    except (DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = args.report or reports_dir() / "bench_hog_svm.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_hog_svm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report.write_text(
        "# HOG-SVM benchmark on the real marketplace data\n\n"
        f"{datetime.date.today().isoformat()}, `{command.strip()}`, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}.\n\n"
        f"Data: {described}, split by product 80/10/10 (stratified, seed {args.seed}). "
        "accuracy and macro-F1 are per held-out test product (its photos' probabilities averaged); "
        "photo columns score each test photo alone. Feature seconds cover train, validation and test photos; "
        "train seconds cover every C tried.\n\n"
        f"{_table(rows)}\n\n" + "\n".join(details) + "\n",
        encoding="utf-8",
    )
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
