"""Train the HOG + linear SVM image baseline and save it as a checkpoint (default: checkpoints/hog-svm).

Examples:
    python scripts/train_hog_svm.py                      # the embedded sample (data/marketplace.db, data/images)
    python scripts/train_hog_svm.py --db-url sqlite:///data/real.db --images ../shared/marketplace/images \\
        --C 0.001 0.01 0.1 --colour-bins 8 --pixels-per-cell 16 32
    python -c 'from marketplace_reco.models import load_model; print(load_model("hog-svm").classes)'
"""

from __future__ import annotations

import argparse
import logging
import sys

from marketplace_reco.data.errors import DataError
from marketplace_reco.models.errors import CheckpointError
from marketplace_reco.models.hog_svm import DEFAULT_PREPROCESSING, train_hog_svm
from marketplace_reco.training.runs import add_data_arguments, add_output_arguments, finish_run, load_splits, output_folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Grey photo -> HOG features (+ optional HSV colour histogram) -> standardisation -> linear SVM, "
                    "trained on the train split's photos; one SVM per --C value, the best on the validation "
                    "products is kept and evaluated on the held-out test products (a product's photos' "
                    "probabilities are averaged). Writes config.json, model.safetensors, README.md and "
                    "confusion_matrix.png.",
    )
    add_data_arguments(parser)
    add_output_arguments(parser, "hog-svm")
    group = parser.add_argument_group("model")
    group.add_argument("--image-size", type=int, default=DEFAULT_PREPROCESSING["image_size"],
                       help="photos are letterboxed to this square size in pixels (default: %(default)s)")
    group.add_argument("--orientations", type=int, default=9, help="HOG orientation bins (default: %(default)s)")
    group.add_argument("--pixels-per-cell", type=int, nargs="+", default=[16],
                       help="HOG cell size(s) in pixels; several give a multi-scale descriptor (default: 16)")
    group.add_argument("--cells-per-block", type=int, default=2, help="HOG block size in cells (default: %(default)s)")
    group.add_argument("--colour-bins", type=int, default=0,
                       help="bins per channel of the joint HSV colour histogram appended to HOG; 0: none "
                            "(default: %(default)s)")
    group.add_argument("--C", type=float, nargs="+", default=[0.01], dest="C_values",
                       help="SVM regularisation value(s); with several, the best on validation is kept (default: 0.01)")
    group.add_argument("--max-iter", type=int, default=5000, help="SVM solver iterations (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run = train_hog_svm(
            load_splits(args),
            C_values=args.C_values,
            preprocessing={"image_size": args.image_size},
            orientations=args.orientations,
            pixels_per_cell=args.pixels_per_cell,
            cells_per_block=args.cells_per_block,
            colour_bins=args.colour_bins,
            max_iter=args.max_iter,
        )
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
