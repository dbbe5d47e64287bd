#!/usr/bin/env python
"""Search benchmark, scale part: exact against approximate listing search on synthetic vectors, FAISS and pgvector.

The vectors are synthetic but clustered like listing embeddings, not uniform noise: 13 "category" centres, 2,000
"product type" clusters around them with Zipf-like sizes, points scattered around their cluster in a 64-dimensional
latent space, mapped linearly into ``--dim`` dimensions with a decaying spectrum (as CNN features concentrate their
variance in few directions), plus a little isotropic noise, then L2-normalised. Queries are new points from the same
distribution (a new listing looking for similar ones), not indexed points.

Sections, each printed as a table and written to reports/bench_search.md:
1. exact crossover: single-query p50/p99 of exact search (``IndexFlatIP``) by size and dimension; where p50
   passes 5 ms is where ``FaissListingIndex`` switches to HNSW (``EXACT_MAX_COMPONENTS``);
2. FAISS at ``--n`` vectors: exact and HNSW build time and memory, recall@10 of HNSW against exact and
   single-query p50/p99 for several ``efSearch``, save/load time and size, incremental add/delete cost;
3. pgvector at ``--pg-n`` vectors (PostgreSQL 16 + pgvector 0.6 from ``--pg-url``, or a throw-away server on
   pgserver's binaries, as the tests start): bulk load and HNSW build time, table and index size, recall@10 and
   query p50/p99 over SQL for several ``hnsw.ef_search``.
Query latencies are measured one query at a time with one FAISS thread (a server answers one request per worker);
builds use every core. The bars of issue 18: at 1,000,000 vectors, recall@10 >= 0.95 at p50 <= 5 ms in process.

The retrieval-quality part of the issue (same-listing recall@1/@10 and MRR, category precision@10, latency over
HTTP) needs the models' ``embed()``; it will be further sections of this script, reading real listings and photos.

    nice -n 19 python scripts/bench_search.py                               # 1,000,000 x 384, pgvector 100,000
    nice -n 19 python scripts/bench_search.py --dim 1280 --n 200000 --pg-n 50000 --crossover-dims \
        --output reports/bench_search_1280.md
    python scripts/bench_search.py --n 20000 --pg-n 5000 --crossover-sizes 2500 5000   # a quick run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np
import psutil
from sqlalchemy import Engine, insert, text

from marketplace_reco.data.database import open_engine
from marketplace_reco.data.schema import create_schema, products
from marketplace_reco.search import EmbeddingSpec, FaissListingIndex, ListingIndex, Neighbour
from marketplace_reco.search.faiss_index import DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH, EXACT_MAX_COMPONENTS
from marketplace_reco.search.pgvector_index import PgvectorListingIndex
from marketplace_reco.settings import reports_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
K = 10
P50_BAR_MS = 5.0
RECALL_BAR = 0.95
_CHUNK = 50_000
_N_CATEGORIES = 13
_N_CLUSTERS = 2_000
_LATENT_DIM = 64
Result = TypeVar("Result")
_EMBEDDING = {"model_name": "synthetic", "model_revision": "bench", "model_type": "synthetic", "encodes": "image"}


# ---- data ------------------------------------------------------------------------------------------------------
class ClusteredVectors:
    """The synthetic distribution (module docstring): fixed by ``dim`` and ``seed``, drawn in chunks on demand."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim = dim
        self.seed = seed

    def _model(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        categories = rng.standard_normal((_N_CATEGORIES, _LATENT_DIM)).astype(np.float32) * 1.5
        clusters = categories[rng.integers(0, _N_CATEGORIES, _N_CLUSTERS)] + \
            rng.standard_normal((_N_CLUSTERS, _LATENT_DIM)).astype(np.float32)
        weights = 1.0 / np.arange(1, _N_CLUSTERS + 1) ** 0.7
        spectrum = (1.0 / np.sqrt(np.arange(1, self.dim + 1))).astype(np.float32)
        mapping = rng.standard_normal((_LATENT_DIM, self.dim)).astype(np.float32) * spectrum
        return clusters, weights / weights.sum(), mapping

    def draw(self, n: int, stream: int) -> Iterator[np.ndarray]:
        """``n`` vectors in chunks of ``_CHUNK``; ``stream`` picks an independent sequence (0: index, 1: queries)."""
        clusters, weights, mapping = self._model()
        rng = np.random.default_rng([self.seed, stream])
        for start in range(0, n, _CHUNK):
            size = min(_CHUNK, n - start)
            latent = clusters[rng.choice(_N_CLUSTERS, size=size, p=weights)] + \
                0.6 * rng.standard_normal((size, _LATENT_DIM)).astype(np.float32)
            vectors = latent @ mapping + 0.02 * rng.standard_normal((size, self.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            yield vectors

    def all(self, n: int, stream: int) -> np.ndarray:
        return np.concatenate(list(self.draw(n, stream)))


def listing_ids(start: int, stop: int) -> list[str]:
    return [f"listing-{number:08d}" for number in range(start, stop)]


# ---- measuring -------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def latencies_ms(index: ListingIndex, queries: np.ndarray) -> tuple[float, float]:
    """p50 and p99 of ``index.search`` for ``K`` neighbours, one query at a time."""
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None, :], K)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall_at_k(found: Sequence[Sequence[Neighbour]], truth: Sequence[Sequence[Neighbour]]) -> float:
    hits = [len({n.listing_id for n in got} & {n.listing_id for n in want}) / len(want)
            for got, want in zip(found, truth)]
    return float(np.mean(hits))


def single_thread(function: Callable[..., Result], *args: object) -> Result:
    """``function(*args)`` with one FAISS/OpenMP thread (as one server worker would), then the count restored."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return function(*args)
    finally:
        faiss.omp_set_num_threads(threads)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- 1. exact crossover ----------------------------------------------------------------------------------------
def exact_crossover(dims: Sequence[int], sizes: Sequence[int], n_queries: int, seed: int) -> str:
    rows = []
    for dim in dims:
        data = ClusteredVectors(dim, seed)
        queries = data.all(n_queries, stream=1)
        vectors = data.all(max(sizes), stream=0)
        for size in sizes:
            index = FaissListingIndex(EmbeddingSpec(**_EMBEDDING, dim=dim), kind="exact")
            index.add(listing_ids(0, size), vectors[:size])
            p50, p99 = single_thread(latencies_ms, index, queries)
            rows.append((dim, f"{size:,}", f"{size * dim / 1e6:.1f}M", f"{p50:.2f}", f"{p99:.2f}",
                         "yes" if p50 <= P50_BAR_MS else "no"))
            say(f"exact dim {dim} n {size}: p50 {p50:.2f} ms p99 {p99:.2f} ms")
    return table(("dim", "listings", "listings x dim", "p50 ms", "p99 ms", f"p50 <= {P50_BAR_MS:g} ms"), rows)


# ---- 2. FAISS at scale -----------------------------------------------------------------------------------------
def faiss_at_scale(n: int, dim: int, n_queries: int, n_latency: int, ef_values: Sequence[int],
                   ef_construction: int, seed: int) -> str:
    data = ClusteredVectors(dim, seed)
    spec = EmbeddingSpec(**_EMBEDDING, dim=dim)
    queries = data.all(n_queries, stream=1)
    rows: list[tuple[object, ...]] = []

    def build(kind: str) -> tuple[FaissListingIndex, float, int]:
        before = rss_bytes()
        index = FaissListingIndex(spec, kind=kind, ef_construction=ef_construction)
        started = time.perf_counter()
        for number, chunk in enumerate(data.draw(n, stream=0)):
            index.add(listing_ids(number * _CHUNK, number * _CHUNK + len(chunk)), chunk)
            if number % 4 == 3:
                say(f"{kind}: {min((number + 1) * _CHUNK, n):,} of {n:,} added")
        return index, time.perf_counter() - started, rss_bytes() - before

    say(f"exact index of {n:,} x {dim}")
    exact, build_s, rss = build("exact")
    truth = exact.search(queries, K)  # batched: FAISS multiplies matrices for exhaustive batches
    p50, p99 = single_thread(latencies_ms, exact, queries[:n_latency])
    rows.append(("exact (IndexFlatIP)", "-", f"{build_s:.0f}", f"{rss / 2**30:.2f}", "1.000", f"{p50:.2f}",
                 f"{p99:.2f}"))
    del exact

    say(f"HNSW index of {n:,} x {dim}")
    hnsw, build_s, rss = build("hnsw")
    for ef in ef_values:
        hnsw.ef_search = ef
        found = single_thread(hnsw.search, queries, K)
        p50, p99 = single_thread(latencies_ms, hnsw, queries[:n_latency])
        recall = recall_at_k(found, truth)
        rows.append((f"HNSW M={hnsw.hnsw_m} efC={hnsw.ef_construction}", ef, f"{build_s:.0f}", f"{rss / 2**30:.2f}",
                     f"{recall:.3f}", f"{p50:.2f}", f"{p99:.2f}"))
        say(f"efSearch {ef}: recall@10 {recall:.3f} p50 {p50:.2f} ms p99 {p99:.2f} ms")
    hnsw.ef_search = DEFAULT_EF_SEARCH
    scale = table(("index", "efSearch", "build s", "RSS growth GiB", "recall@10 vs exact", "p50 ms", "p99 ms"), rows)
    scale += f"\n\nThe vectors alone are {n * dim * 4 / 2**30:.2f} GiB (float32)."

    updates = incremental_updates(hnsw, data)
    folder = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        save_s, size_gib, expected = timed_save(hnsw, folder / "index", queries[:n_latency])
        say(f"save {save_s:.1f} s, {size_gib:.2f} GiB")
        del hnsw  # a million vectors twice over would not fit beside the loading
        loaded = timed_load(folder / "index", queries[:n_latency], expected)
    finally:
        shutil.rmtree(folder)
    saved = table(("step", "seconds", "GiB on disk"), [("save_pretrained (vectors, ids, graph, sha256)",
                                                         f"{save_s:.1f}", f"{size_gib:.2f}")])
    return f"{scale}\n\n{updates}\n\n{saved}\n\n{loaded}"


def incremental_updates(index: FaissListingIndex, data: ClusteredVectors, batch: int = 1_000) -> str:
    """Cost of adding, upserting and deleting ``batch`` listings in a built index (then undone)."""
    new = next(data.draw(batch, stream=2))
    ids = [f"new-{number:06d}" for number in range(batch)]
    rows = []
    for action, run in (("add", lambda: index.add(ids, new)), ("upsert", lambda: index.upsert(ids, new[::-1])),
                        ("delete", lambda: index.delete(ids))):
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        rows.append((action, f"{batch:,}", f"{seconds:.2f}", f"{seconds / batch * 1000:.2f}"))
        say(f"{action} {batch}: {seconds:.2f} s")
    return table(("update", "listings", "seconds", "ms per listing"), rows)


def timed_save(index: FaissListingIndex, folder: Path, queries: np.ndarray,
               ) -> tuple[float, float, list[list[Neighbour]]]:
    """Save ``index`` into ``folder``: seconds, GiB on disk, and its answers to ``queries`` for comparison."""
    started = time.perf_counter()
    index.save_pretrained(folder)
    seconds = time.perf_counter() - started
    size_gib = sum(path.stat().st_size for path in folder.iterdir()) / 2**30
    return seconds, size_gib, single_thread(index.search, queries, K)


def timed_load(folder: Path, queries: np.ndarray, expected: list[list[Neighbour]]) -> str:
    started = time.perf_counter()
    loaded = FaissListingIndex.from_pretrained(folder)
    seconds = time.perf_counter() - started
    same = single_thread(loaded.search, queries, K) == expected
    say(f"load {seconds:.1f} s, same answers: {same}")
    return table(("step", "seconds", "same answers as before saving"), [("from_pretrained", f"{seconds:.1f}", same)])


# ---- 3. pgvector -----------------------------------------------------------------------------------------------
def pgvector_at_scale(engine: Engine, n: int, dim: int, n_queries: int, n_latency: int, ef_values: Sequence[int],
                      workers: int, memory: str, seed: int) -> str:
    data = ClusteredVectors(dim, seed)
    queries = data.all(n_queries, stream=1)
    vectors = data.all(n, stream=0)
    ids = listing_ids(0, n)
    exact = FaissListingIndex(EmbeddingSpec(**_EMBEDDING, dim=dim), kind="exact")
    exact.add(ids, vectors)
    truth = exact.search(queries, K)

    create_schema(engine)
    with engine.begin() as conn:
        conn.execute(insert(products), [{"id": listing_id, "product_name": listing_id} for listing_id in ids])
    index = PgvectorListingIndex.create(engine, EmbeddingSpec(**_EMBEDDING, dim=dim), name="bench_embeddings",
                                        kind="exact", replace=True)
    started = time.perf_counter()
    for start in range(0, n, _CHUNK):
        index.add(ids[start:start + _CHUNK], vectors[start:start + _CHUNK])
    load_s = time.perf_counter() - started
    say(f"pgvector: {n:,} rows loaded by COPY in {load_s:.0f} s; building HNSW")
    started = time.perf_counter()
    index.build_hnsw(maintenance_work_mem=memory, parallel_workers=workers)
    build_s = time.perf_counter() - started
    with engine.connect() as conn:
        table_bytes = conn.execute(text("SELECT pg_total_relation_size('bench_embeddings') "
                                        "- pg_indexes_size('bench_embeddings')")).scalar_one()
        hnsw_bytes = conn.execute(text("SELECT pg_relation_size('bench_embeddings_hnsw')")).scalar_one()
    say(f"pgvector HNSW built in {build_s:.0f} s")
    rows = []
    for ef in ef_values:
        index.ef_search = ef
        found = index.search(queries, K)
        p50, p99 = latencies_ms(index, queries[:n_latency])
        recall = recall_at_k(found, truth)
        rows.append((f"HNSW m={index.hnsw_m} ef_construction={index.ef_construction}", ef, f"{recall:.3f}",
                     f"{p50:.2f}", f"{p99:.2f}"))
        say(f"pgvector ef_search {ef}: recall@10 {recall:.3f} p50 {p50:.2f} ms p99 {p99:.2f} ms")
    index.drop()
    summary = table(("rows", "dim", "COPY load s", "HNSW build s", "workers", "maintenance_work_mem", "table GiB",
                     "HNSW index GiB"),
                    [(f"{n:,}", dim, f"{load_s:.0f}", f"{build_s:.0f}", 1 + workers, memory,
                      f"{table_bytes / 2**30:.2f}", f"{hnsw_bytes / 2**30:.2f}")])
    return summary + "\n\n" + table(("index", "ef_search", "recall@10 vs exact", "p50 ms", "p99 ms"), rows)


def pgvector_engine(url: str | None) -> tuple[Engine, Callable[[], None]]:
    """An engine on ``url``, or on a throw-away pgvector server like the tests' (and how to stop it)."""
    if url:
        engine = open_engine(url)
        return engine, engine.dispose
    # The test services' server: the same PostgreSQL 16 + pgvector that the tests run against.
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from services import PgvectorServer, find_pgvector_bin_dir

    bin_dir = find_pgvector_bin_dir()
    if bin_dir is None:
        raise SystemExit("error: no --pg-url and pgserver is not installed (pip install the dev extra)")
    server = PgvectorServer(bin_dir=bin_dir).start()
    engine = open_engine(server.create_database("bench_search"))

    def stop() -> None:
        engine.dispose()
        server.stop()

    return engine, stop


# ---- main ------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the FAISS scale test")
    parser.add_argument("--dim", type=int, default=384,
                        help="dimension of the scale tests (384: MiniLM's text vectors; 1280: tf_efficientnet_lite0's "
                             "image features, which at 1,000,000 vectors need about 11 GiB free)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall")
    parser.add_argument("--latency-queries", type=int, default=300, help="queries timed one by one")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--ef-construction", type=int, default=DEFAULT_EF_CONSTRUCTION,
                        help="HNSW efConstruction of the FAISS scale test")
    parser.add_argument("--crossover-dims", type=int, nargs="*", default=[384, 768, 1280],
                        help="dimensions of the exact-crossover section (none: skip it)")
    parser.add_argument("--crossover-sizes", type=int, nargs="+", default=[2_500, 5_000, 10_000, 20_000, 40_000])
    parser.add_argument("--pg-n", type=int, default=100_000, help="vectors in the pgvector test (0: skip it)")
    parser.add_argument("--pg-url", help="a PostgreSQL database with pgvector (default: start a throw-away server)")
    parser.add_argument("--pg-ef-search", type=int, nargs="+", default=[40, 100, 200, 400])
    parser.add_argument("--pg-workers", type=int, default=1, help="parallel maintenance workers for the HNSW build")
    parser.add_argument("--pg-memory", default="2GB", help="maintenance_work_mem for the HNSW build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="report file (default reports/bench_search.md)")
    args = parser.parse_args(argv)
    output = args.output or reports_dir() / "bench_search.md"
    command = " ".join(["python scripts/bench_search.py", *(argv if argv is not None else sys.argv[1:])])

    sections = []
    if args.crossover_dims:
        say("1. exact crossover")
        crossover = exact_crossover(args.crossover_dims, args.crossover_sizes, args.latency_queries, args.seed)
        sections += ["## 1. Exact search: where it stops meeting 5 ms", crossover,
                     (f"`FaissListingIndex` searches exactly while listings x dim <= {EXACT_MAX_COMPONENTS:,} "
                      "(`EXACT_MAX_COMPONENTS`), and builds HNSW above.")]
    say(f"2. FAISS at {args.n:,} x {args.dim}")
    scale = faiss_at_scale(args.n, args.dim, args.queries, args.latency_queries, args.ef_search,
                           args.ef_construction, args.seed)
    sections += [f"## 2. FAISS at {args.n:,} vectors of dim {args.dim}", scale]
    if args.pg_n:
        say(f"3. pgvector at {args.pg_n:,} x {args.dim}")
        engine, stop = pgvector_engine(args.pg_url)
        try:
            with engine.connect() as conn:
                versions = conn.execute(text("SELECT version(), (SELECT extversion FROM pg_extension "
                                             "WHERE extname = 'vector')")).one()
            pg = pgvector_at_scale(engine, args.pg_n, args.dim, args.queries, min(args.latency_queries, 200),
                                   args.pg_ef_search, args.pg_workers, args.pg_memory, args.seed)
        finally:
            stop()
        sections += [f"## 3. pgvector at {args.pg_n:,} vectors of dim {args.dim}",
                     f"{versions[0].split(',')[0]}, pgvector {versions[1]}.", pg]

    header = (f"# Listing search benchmark (scale)\n\n"
              f"{datetime.date.today().isoformat()}, {platform.node() or 'machine'}: {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB, FAISS {faiss.__version__}. Command: `{command}`\n\n"
              f"Vectors: synthetic, clustered (see the script's docstring), L2-normalised; {args.queries} held-out "
              f"queries for recall, {args.latency_queries} timed one at a time with one FAISS thread.")
    report = "\n\n".join([header, *sections]) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")
    print(report)
    say(f"report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
