#!/usr/bin/env python
"""Similar listings from the command line: a photo, a text or a listing id -> the nearest listings of an index.

    python scripts/search.py --index image-index --photo sofa.jpg --photo sofa-back.jpg    # one listing's photos
    python scripts/search.py --index text-index --text "oak dining table and four chairs" -k 5
    python scripts/search.py --index fusion-index --listing-id 0a1b2c... --category "Home & Garden" --max-price 200
    python scripts/search.py --index pgvector:listing_embeddings --db-url postgresql+psycopg2://... --text "bike"

Prints the query, then one line per neighbour: rank, listing id, score, category, price and name. Photos and
texts are embedded by the model that built the index (its name and revision are checked).
"""

from __future__ import annotations

import argparse
import sys

from marketplace_reco.data.database import open_engine
from marketplace_reco.data.errors import DataError
from marketplace_reco.data.images import load_image
from marketplace_reco.models import CheckpointError, load_model
from marketplace_reco.search import SearchError, SearchFilters
from marketplace_reco.search.build import load_index
from marketplace_reco.search.catalogue import listing_details
from marketplace_reco.search.similar import query_vector_of_listing, similar_listings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True,
                        help="a FAISS index (name under the checkpoints folder, folder, s3:// or repo id) or "
                             "pgvector:<table> in the --db-url database")
    parser.add_argument("--index-revision", default=None)
    parser.add_argument("--db-url", default=None, help="marketplace database (default: $MARKETPLACE_DB_URL)")
    query = parser.add_argument_group("query (a listing id, or photos and/or a text)")
    query.add_argument("--listing-id", default=None, help="a listing of the index: its neighbours, never itself")
    query.add_argument("--photo", action="append", default=[], help="a photo file (repeat for several photos of "
                                                                     "one listing)")
    query.add_argument("--text", default=None, help="a listing's title and description")
    query.add_argument("--model", default=None, help="the model embedding the query (default: the index's)")
    query.add_argument("--model-revision", default=None)
    parser.add_argument("-k", type=int, default=10, help="how many neighbours")
    filters = parser.add_argument_group("filters")
    filters.add_argument("--category", default=None, help="a category path prefix, e.g. 'Home & Garden'")
    filters.add_argument("--min-price", type=float, default=None)
    filters.add_argument("--max-price", type=float, default=None)
    filters.add_argument("--location", default=None, help="a substring of the location, any case")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.listing_id is None) == (not args.photo and args.text is None):
        parser.error("give either --listing-id, or --photo and/or --text")
    try:
        index = load_index(args.index, db_url=args.db_url, revision=args.index_revision)
        engine = open_engine(args.db_url)
        filters = SearchFilters(category=args.category, min_price=args.min_price, max_price=args.max_price,
                                location=args.location)
        if args.listing_id is not None:
            vector = query_vector_of_listing(index, args.listing_id)
            own = listing_details(engine, [args.listing_id]).get(args.listing_id)
            print(f"query: listing {args.listing_id}"
                  + (f" [{own.category}] {own.name}" if own is not None else " (not in the products table)"))
            excluded = frozenset([args.listing_id])
        else:
            model = load_model(args.model or index.embedding.model_name, revision=args.model_revision)
            index.check_model(model.source.get("name", ""), model.source.get("revision", ""))
            inputs = {}
            if args.photo:
                inputs["images"] = [[load_image(path) for path in args.photo]]
            if args.text is not None:
                inputs["texts"] = [args.text]
            vector = model.embed(**inputs)
            print("query: " + ", ".join([*args.photo, *([repr(args.text)] if args.text is not None else [])]))
            excluded = frozenset()
        found = similar_listings(index, engine, vector, args.k, exclude_ids=excluded, filters=filters)
    except (SearchError, CheckpointError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rank, listing in enumerate(found, start=1):
        details = listing.details
        price = "" if details.price is None else f"£{details.price:,.2f}"
        print(f"{rank:3d}. {details.listing_id}  {listing.score:.3f}  [{details.category or 'no category'}]  "
              f"{price}  {details.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
