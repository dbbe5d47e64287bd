"""Train the HOG + linear SVM image baseline and save it as a checkpoint (default: checkpoints/hog-svm).

Examples:
    python scripts/train_hog_svm.py                      # the embedded sample (data/marketplace.db, data/images)
    python scripts/train_hog_svm.py --db-url sqlite:///data/real.db --images ../shared/marketplace/images \\
        --C 0.0001 0.0003 0.001 --pixels-per-cell 16 32
    python -c 'from marketplace_reco.models import load_model; print(load_model("hog-svm").classes)'
"""

from __future__ import annotations

import argparse
import logging
import sys

from marketplace_reco.data.errors import DataError
from marketplace_reco.models.errors import CheckpointError
from marketplace_reco.models.hog_svm import DEFAULT_PREPROCESSING, HogSvmClassifier, train_hog_svm
from marketplace_reco.training.runs import (
    add_data_arguments,
    add_output_arguments,
    default_arguments,
    finish_run,
    load_splits,
    output_folder,
)

_DEFAULTS = default_arguments(HogSvmClassifier.__init__)
_MODEL_OPTIONS = ("orientations", "pixels_per_cell", "cells_per_block", "colour_bins", "lbp_grid", "max_iter")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Photo -> grey HOG features (+ HSV colour and LBP texture histograms) -> standardisation -> "
                    "linear SVM, "
                    "trained on the train split's photos; one SVM per --C value, the best on the validation "
                    "products is kept and evaluated on the held-out test products (a product's photos' "
                    "probabilities are averaged). Writes config.json, model.safetensors, README.md and "
                    "confusion_matrix.png.",
    )
    add_data_arguments(parser)
    add_output_arguments(parser, "hog-svm")
    group = parser.add_argument_group("model (defaults: the hog-svm model's own)")
    group.add_argument("--image-size", type=int, default=None,
                       help="photos are letterboxed to this square size in pixels "
                            f"({DEFAULT_PREPROCESSING['image_size']})")
    group.add_argument("--orientations", type=int, default=None,
                       help=f"HOG orientation bins ({_DEFAULTS['orientations']})")
    group.add_argument("--pixels-per-cell", type=int, nargs="+", default=None,
                       help=f"HOG cell size(s) in pixels; several give a multi-scale descriptor "
                            f"({' '.join(map(str, _DEFAULTS['pixels_per_cell']))})")
    group.add_argument("--cells-per-block", type=int, default=None,
                       help=f"HOG block size in cells ({_DEFAULTS['cells_per_block']})")
    group.add_argument("--colour-bins", type=int, default=None,
                       help=f"bins per channel of the joint HSV colour histogram; 0: none ({_DEFAULTS['colour_bins']})")
    group.add_argument("--lbp-grid", type=int, default=None,
                       help=f"local binary pattern texture histograms over an N x N grid and the whole photo; 0: none "
                            f"({_DEFAULTS['lbp_grid']})")
    group.add_argument("--C", type=float, nargs="+", default=[_DEFAULTS["C"]], dest="C_values",
                       help=f"SVM regularisation value(s); with several, the best on the validation products is kept "
                            f"({_DEFAULTS['C']})")
    group.add_argument("--max-iter", type=int, default=None, help=f"SVM solver iterations ({_DEFAULTS['max_iter']})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        hyperparameters = {name: getattr(args, name) for name in _MODEL_OPTIONS if getattr(args, name) is not None}
        if args.image_size is not None:
            hyperparameters["preprocessing"] = {"image_size": args.image_size}
        run = train_hog_svm(load_splits(args), C_values=args.C_values, random_state=args.seed, **hyperparameters)
        finish_run(run.model, output_folder(args), metrics=run.metrics, data_summary=run.data_summary,
                   push_to=args.push_to, revision=args.revision)
    except (DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    timing = run.metrics["timing_s"]
    print(f"  per photo: accuracy {run.metrics['per_image']['accuracy']:.4f}, "
          f"macro-F1 {run.metrics['per_image']['macro_f1']:.4f}; feature extraction {timing['feature_extraction']}s, "
          f"training {timing['training']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
