#!/usr/bin/env python
"""Build or update a similar-listing index: a model by name + the marketplace database (+ photos) -> an index.

An index that exists is updated: only new listings (and --refresh-ids) are embedded, listings gone from the
database are deleted; an index of another model or revision is refused (--rebuild starts over).

    python scripts/build_index.py --model image-classifier --index image-index          # FAISS, in checkpoints/
    python scripts/build_index.py --model fusion --backend pgvector \\
        --db-url postgresql+psycopg2://user:pw@host/db                                  # table listing_embeddings
    torchrun --nproc_per_node 4 scripts/build_index.py --model fusion --index fusion-index

Under torchrun every rank embeds every world_size-th listing to embed; with pgvector each rank writes its own
rows, with FAISS rank 0 gathers the shards, writes and saves the index.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from marketplace_reco._progress import write
from marketplace_reco.data.database import open_engine
from marketplace_reco.data.errors import DataError
from marketplace_reco.data.image_store import open_image_store
from marketplace_reco.models import CheckpointError, load_model
from marketplace_reco.search import FaissListingIndex, SearchError
from marketplace_reco.search.build import (
    BACKENDS,
    DEFAULT_BATCH_SIZE,
    embed_listings,
    embedding_spec,
    finish_update,
    index_folder,
    open_or_create_index,
    plan_update,
    write_vectors,
)
from marketplace_reco.search.catalogue import read_catalogue
from marketplace_reco.search.pgvector_index import DEFAULT_NAME
from marketplace_reco.training.distributed import DistributedContext, init_distributed

# What a rank embedded: listing ids, their vectors (None once written to pgvector), ids without a vector.
Shard = tuple[list[str], np.ndarray | None, list[str]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the embedding model: checkpoint name, folder, s3:// or repo")
    parser.add_argument("--model-revision", default=None)
    parser.add_argument("--db-url", default=None, help="marketplace database (default: $MARKETPLACE_DB_URL)")
    parser.add_argument("--images", default=None, help="photo folder or s3://bucket/prefix (default: "
                                                        "$MARKETPLACE_IMAGES)")
    parser.add_argument("--backend", choices=BACKENDS, default="faiss",
                        help="faiss: an index folder; pgvector: a table in the products' PostgreSQL database")
    parser.add_argument("--index", default=None,
                        help=f"faiss: index name (under the checkpoints folder) or folder; pgvector: table name "
                             f"(default {DEFAULT_NAME})")
    parser.add_argument("--kind", default=None,
                        help="faiss: auto (default), exact or hnsw; pgvector: hnsw or exact (default: a new index "
                             "is loaded exact, then its HNSW graph is built once)")
    parser.add_argument("--rebuild", action="store_true", help="start a new index, replacing any at --index")
    parser.add_argument("--refresh-ids", type=Path, default=None,
                        help="a file of listing ids (one a line) whose text or photos changed: re-embedded")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="listings per model call")
    parser.add_argument("--push-to", default=None, help="faiss: also push the index to this hub location")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.backend == "faiss" and not args.index:
        print("error: --index NAME is needed with the faiss backend (where the index is saved)", file=sys.stderr)
        return 2
    context = init_distributed()
    started = time.perf_counter()
    try:
        refresh = args.refresh_ids.read_text(encoding="utf-8").split() if args.refresh_ids else []
        model = load_model(args.model, revision=args.model_revision).to(context.device)
        spec = embedding_spec(model)
        engine = open_engine(args.db_url)
        # Rank 0 creates (or replaces) the index first; the others then open what it made, or, for FAISS, read the
        # same saved index (or start the same empty one), so every rank plans the same update.
        options = {"backend": args.backend, "target": args.index, "engine": engine, "kind": args.kind}
        if context.is_main:
            index = open_or_create_index(spec, rebuild=args.rebuild, **options)
        context.barrier()
        if not context.is_main:
            index = open_or_create_index(spec, rebuild=args.rebuild and args.backend == "faiss", **options)
        catalogue = read_catalogue(engine)
        plan = plan_update(index.listing_ids(), catalogue, spec.encodes, refresh)
        if context.is_main:
            write(f"{len(plan.embed)} listing(s) to embed over {context.world_size} process(es), "
                  f"{len(plan.delete)} to delete, {plan.unchanged} unchanged")
        ids, vectors, without_vector = embed_listings(model, catalogue, plan.shard(context.rank, context.world_size),
                                                      open_image_store(args.images), batch_size=args.batch_size,
                                                      progress=context.is_main)
        if args.backend == "pgvector":
            write_vectors(index, ids, vectors)
            shards = _gather((ids, None, without_vector), context)
        else:
            shards = _gather((ids, vectors, without_vector), context)
        if context.is_main:
            all_ids = [listing_id for shard_ids, _, _ in shards for listing_id in shard_ids]
            all_without = [listing_id for _, _, shard_without in shards for listing_id in shard_without]
            if args.backend == "faiss":
                write_vectors(index, all_ids, np.concatenate([shard_vectors for _, shard_vectors, _ in shards]))
            report = finish_update(index, plan, all_ids, all_without,
                                   build_hnsw=args.backend == "pgvector" and args.kind is None)
            report.seconds = time.perf_counter() - started
            where = f"table {getattr(index, 'name', args.index)}"
            if isinstance(index, FaissListingIndex):
                where = str(index.save_pretrained(index_folder(args.index)))
                if args.push_to:
                    revision = index.push_to_hub(args.push_to)
                    write(f"pushed to {args.push_to} (revision {revision})")
            write(f"index of {spec.model_name} ({spec.encodes}, dim {spec.dim}, revision {spec.model_revision}) at "
                  f"{where}: {len(index)} listings; {report.summary()}")
        context.barrier()
    except (SearchError, CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        context.close()
    return 0


def _gather(shard: Shard, context: DistributedContext) -> list[Shard]:
    """Every rank's shard on rank 0, in rank order (other ranks get an empty list); the shard alone in one process."""
    if not context.is_distributed:
        return [shard]
    gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(shard, gathered, dst=0)
    return gathered or []


if __name__ == "__main__":
    sys.exit(main())
