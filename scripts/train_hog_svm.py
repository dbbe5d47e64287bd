"""Train the HOG + linear SVM image baseline and save it as a checkpoint (default: checkpoints/hog-svm).

Examples:
    python scripts/train_hog_svm.py                      # the embedded sample (data/marketplace.db, data/images)
    python scripts/train_hog_svm.py --db-url sqlite:///data/real.db --images ../shared/marketplace/images \\
        --C 0.0001 0.0003 0.001 --pixels-per-cell 16 32
    python -c 'from marketplace_reco.models import load_model; print(load_model("hog-svm").classes)'
"""

from __future__ import annotations

import argparse
import sys

from marketplace_reco.data import Marketplace
from marketplace_reco.models import HogSvmClassifier
from marketplace_reco.models.hog_svm import DEFAULT_PREPROCESSING
from marketplace_reco.training import TrainResult, hog_svm, runs
from marketplace_reco.training.distributed import DistributedContext

_MODEL_OPTIONS = ("orientations", "pixels_per_cell", "cells_per_block", "colour_bins", "lbp_grid", "max_iter")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Photo -> grey HOG features (+ HSV colour and LBP texture histograms) -> standardisation -> "
                    "linear SVM, trained on the train split's photos; one SVM per --C value, the best on the "
                    "validation products is kept and evaluated on the held-out test products (a product's photos' "
                    "probabilities are averaged). Writes config.json, model.safetensors, README.md and "
                    "confusion_matrix.png.",
    )
    runs.add_data_arguments(parser)
    runs.add_output_arguments(parser, "hog-svm")
    defaults = runs.default_arguments(HogSvmClassifier.__init__)
    group = parser.add_argument_group("model")
    group.add_argument("--image-size", type=int, default=DEFAULT_PREPROCESSING["image_size"],
                       help="photos are letterboxed to this square size in pixels (default: %(default)s)")
    group.add_argument("--orientations", type=int, default=defaults["orientations"],
                       help="HOG orientation bins (default: %(default)s)")
    group.add_argument("--pixels-per-cell", type=int, nargs="+", default=list(defaults["pixels_per_cell"]),
                       help="HOG cell size(s) in pixels; several give a multi-scale descriptor (default: %(default)s)")
    group.add_argument("--cells-per-block", type=int, default=defaults["cells_per_block"],
                       help="HOG block size in cells (default: %(default)s)")
    group.add_argument("--colour-bins", type=int, default=defaults["colour_bins"],
                       help="bins per channel of the joint HSV colour histogram; 0: none (default: %(default)s)")
    group.add_argument("--lbp-grid", type=int, default=defaults["lbp_grid"],
                       help="local binary pattern texture histograms over an N x N grid and the whole photo; 0: none "
                            "(default: %(default)s)")
    group.add_argument("--max-iter", type=int, default=defaults["max_iter"],
                       help="SVM solver iterations (default: %(default)s)")
    runs.add_config_arguments(parser, hog_svm.HogSvmTrainConfig, "training")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = runs.config_from_arguments(hog_svm.HogSvmTrainConfig, args)

    def fit(splits: dict[str, Marketplace], context: DistributedContext) -> tuple[HogSvmClassifier, TrainResult]:
        model = HogSvmClassifier(splits["train"].classes, preprocessing={"image_size": args.image_size},
                                 random_state=args.seed, **{name: getattr(args, name) for name in _MODEL_OPTIONS})
        return model, hog_svm.train(model, splits, config, context)

    return runs.run_training(args, fit)


if __name__ == "__main__":
    sys.exit(main())
