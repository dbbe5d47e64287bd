"""Score one or more checkpoints on any dataset, per product: check a model on your newest listings before deploying.

Models are named as everywhere (a checkpoint name, a folder, s3://bucket/prefix/name or a Hugging Face repo id).
The data is a database (--db-url, --images) or a CSV export (--data: products.csv, images.csv and images/,
imported into a temporary SQLite database on the fly). All of it is scored, or one split of it (--split, with
the same split arguments a training run used, to score exactly its held-out products).

Prints a markdown table (accuracy, macro-F1, expected calibration error, the worst-recalled classes) and, per
model, writes <output>/<model>/metrics.json and confusion_matrix.png.

Examples:
    python scripts/evaluate.py text-cnn fusion --data ../shared/marketplace
    python scripts/evaluate.py s3://models/image-classifier --db-url $MARKETPLACE_DB_URL --images s3://bucket/images
    python scripts/evaluate.py text-cnn --db-url sqlite:///data/marketplace.db --images data/images --split test
    python scripts/evaluate.py text-transformer --split test --quantization int8   # as served quantized
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marketplace_reco.models import QUANTIZATIONS
from marketplace_reco.settings import reports_dir
from marketplace_reco.training.benchmarks import add_export_arguments, load_export
from marketplace_reco.training.evaluation import SPLIT_NAMES, evaluate_checkpoints, evaluation_table
from marketplace_reco.training.runs import RUN_ERRORS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="checkpoints to score: names, folders, s3:// locations or Hugging Face repo ids")
    parser.add_argument("--revision", default=None, help="revision of every model (default: the latest)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="score the models as a server with MARKETPLACE_QUANTIZATION serves them (default: their "
                             "float weights)")
    add_export_arguments(parser)
    group = parser.add_argument_group("which products")
    group.add_argument("--split", choices=SPLIT_NAMES, default=None,
                       help="score only this split of a split by product (default: every product)")
    group.add_argument("--val-fraction", type=float, default=0.1, help="with --split (default: %(default)s)")
    group.add_argument("--test-fraction", type=float, default=0.1, help="with --split (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="with --split (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for each model's metrics.json and confusion_matrix.png "
                             "(default: <reports folder>/evaluate)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        marketplace, described = load_export(args)
        if args.split is not None:
            fractions = (1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
            marketplace = marketplace.split(fractions, seed=args.seed)[args.split]
            described += f", split {args.split} (fractions {fractions}, seed {args.seed})"
        results = evaluate_checkpoints(args.models, marketplace, args.output or reports_dir() / "evaluate",
                                       revision=args.revision, quantization=args.quantization)
    except RUN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Data: {described}; {len(marketplace.products):,} products.\n")
    print(evaluation_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
