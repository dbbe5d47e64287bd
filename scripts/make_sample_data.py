"""Generate the embedded sample marketplace (synthetic listings and photos of the 13 real classes).

Example:
    python scripts/make_sample_data.py                      # into data/marketplace.db and data/images
    python scripts/make_sample_data.py --products 1300 --seed 1 --db-url sqlite:///data/big.db --images data/big
"""

from __future__ import annotations

import argparse
import sys

from marketplace_reco.data.errors import DataError
from marketplace_reco.data.sample import make_sample_marketplace
from marketplace_reco.settings import default_db_url, default_image_location


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a small synthetic marketplace (titles, descriptions, prices and procedurally drawn "
                    "photos of the 13 real classes) through the same CSV import and image store as real data. "
                    "Text alone and photos alone each predict the class imperfectly; together they do much "
                    "better. The output is identical for the same --products and --seed.",
    )
    parser.add_argument("--db-url", default=None,
                        help="database to write the products and images tables to (created if missing; refused "
                             "if it already holds other products) "
                             f"(default: $MARKETPLACE_DB_URL or {default_db_url()})")
    parser.add_argument("--images", default=None,
                        help="where to write the photos as <image id>.jpg: a folder or s3://bucket/prefix "
                             f"(default: $MARKETPLACE_IMAGES or {default_image_location()})")
    parser.add_argument("--products", type=int, default=390,
                        help="number of products, spread evenly over the 13 classes, 1-3 photos each (default: 390)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = make_sample_marketplace(args.db_url, args.images, n_products=args.products, seed=args.seed,
                                          progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Sample marketplace (seed {summary['seed']}): {summary['products']:,} products, "
          f"{summary['images']:,} photos")
    print(f"  database: {summary['database']}")
    print(f"  photos:   {summary['images_location']}")
    width = max(map(len, summary["classes"]))
    for name, count in summary["classes"].items():
        print(f"  {name.ljust(width)}  {count:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
