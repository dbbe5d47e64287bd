"""Import the users' CSV export (products.csv + images.csv) into a database, idempotently.

Example:
    python scripts/import_csv.py --products ../shared/marketplace/products.csv \\
        --images ../shared/marketplace/images.csv --db-url sqlite:///data/marketplace.db
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marketplace_reco.data.errors import DataError
from marketplace_reco.data.importer import MAX_RECORD_LINES, import_csv
from marketplace_reco.settings import default_db_url


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Load the marketplace CSV export into any SQLAlchemy database URL. Rows are matched on id: "
                    "new ones are inserted, changed ones updated, so importing twice leaves one copy. "
                    "Every line is accounted for: rejected records are listed with their lines and reason, and "
                    "an unbalanced quote costs only its own record.",
    )
    parser.add_argument("--products", type=Path, required=True,
                        help="products CSV (columns: unnamed index, id, product_name, category, "
                             "product_description, price, location)")
    parser.add_argument("--images", type=Path, required=True,
                        help="images CSV (columns: unnamed index, id, product_id, bucket_link, image_ref, "
                             "create_time as dd/mm/yyyy)")
    parser.add_argument("--db-url", default=None,
                        help="target database, e.g. sqlite:///data/marketplace.db or "
                             "postgresql+psycopg2://user:password@host:5432/dbname; tables are created if missing "
                             f"(default: $MARKETPLACE_DB_URL or {default_db_url()})")
    parser.add_argument("--rejected-csv", type=Path, default=None,
                        help="also write every rejected record (file, first_line, last_line, id, reason) to this "
                             "CSV file")
    parser.add_argument("--max-record-lines", type=int, default=MAX_RECORD_LINES,
                        help="most physical lines one record may span; a quoted field still open after that many "
                             f"lines is rejected as an unbalanced quote (default: {MAX_RECORD_LINES}; every record "
                             "of the real export is one line, its longest description holds 519 line breaks)")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = import_csv(args.products, args.images, args.db_url, progress=not args.no_progress,
                            max_record_lines=args.max_record_lines)
        if args.rejected_csv is not None:
            report.write_rejected_csv(args.rejected_csv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write {args.rejected_csv}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
