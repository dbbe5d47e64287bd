#!/usr/bin/env python
"""Search benchmark: exact against approximate search at scale (FAISS, pgvector), and retrieval quality on real data.

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
   query p50/p99 over SQL for several ``hnsw.ef_search``;
4. retrieval quality on real listings (with --image-model / --text-model / --fusion-model, checkpoint names or
   paths): same-listing recall@1/@10 and MRR (a photo as the query among every photo, by exact cosine similarity;
   the answers are its listing's other photos, listings with >= 2 photos; the queries are the listings the image
   model was not trained on, when its recorded split can be rebuilt from the data), category precision@10 listing
   -> listings for image, text and fusion vectors, query latency p50/p99 in process and over HTTP (``POST
   /similar`` on a loopback uvicorn) with ``--http-listings`` listings (the real listings' vectors padded with
   synthetic ones of the same dimension), and the time to embed and index.
Query latencies are measured one query at a time with one FAISS thread (a server answers one request per worker);
builds use every core. The bars of issue 18: at 1,000,000 vectors, recall@10 >= 0.95 at p50 <= 5 ms in process;
same-listing recall@10 >= 0.80; fusion category precision@10 >= 0.80; /similar p50 <= 30 ms at 100,000 listings.

    nice -n 19 python scripts/bench_search.py                               # 1,000,000 x 384, pgvector 100,000
    nice -n 19 python scripts/bench_search.py --dim 1280 --n 200000 --pg-n 50000 --crossover-dims \
        --output reports/bench_search_1280.md
    python scripts/bench_search.py --n 20000 --pg-n 5000 --crossover-sizes 2500 5000   # a quick run
    nice -n 19 python scripts/bench_search.py --skip-scale --image-model .cache/bench_models/seed0/image \
        --text-model .cache/bench_models/seed0/text-cnn                     # section 4 on ../shared/marketplace
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import faiss
import httpx
import numpy as np
import pandas as pd
import psutil
import uvicorn
from sqlalchemy import Engine, insert, text

from marketplace_reco._progress import progress_bar
from marketplace_reco.data.database import open_engine
from marketplace_reco.data.dataset import load_marketplace
from marketplace_reco.data.image_store import ImageStore, open_image_store
from marketplace_reco.data.images import load_image
from marketplace_reco.data.importer import import_csv
from marketplace_reco.data.schema import create_schema, products
from marketplace_reco.models import ImageClassifier, load_model, mean_by_listing
from marketplace_reco.models._listings import l2_normalize_rows
from marketplace_reco.search import EmbeddingSpec, FaissListingIndex, ListingIndex, Neighbour
from marketplace_reco.search.catalogue import read_catalogue
from marketplace_reco.search.faiss_index import DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH, EXACT_MAX_COMPONENTS
from marketplace_reco.search.pgvector_index import PgvectorListingIndex
from marketplace_reco.serving import ServingSettings, create_app
from marketplace_reco.serving.connections import uvicorn_config
from marketplace_reco.settings import benchmark_export_dir, reports_dir
from marketplace_reco.training.metrics import same_listing_ranks
from marketplace_reco.training.runs import products_fingerprint

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
# ---- 4. retrieval quality on real listings -------------------------------------------------------------------
@dataclass
class Embedded:
    """Unit vectors of one kind and the listing (or photo) ids they belong to."""

    ids: list[str]
    vectors: np.ndarray


def image_features(model: ImageClassifier, catalogue: pd.DataFrame, store: ImageStore,
                   batch: int = 64) -> tuple[list[str], list[str], np.ndarray]:
    """(photo ids, their listing ids, ``photo_vectors`` rows: what ``embed`` averages) of every photo: what both
    image indexes come from."""
    photo_ids = [image_id for image_ids in catalogue["image_ids"] for image_id in image_ids]
    owners = [listing for listing, image_ids in zip(catalogue["listing_id"], catalogue["image_ids"])
              for _ in image_ids]
    rows = []
    for start in progress_bar(range(0, len(photo_ids), batch), desc="image features", unit="batch"):
        chunk = photo_ids[start:start + batch]
        encoded = store.get_many(chunk)
        rows.append(model.photo_vectors([load_image(encoded[image_id], name=image_id) for image_id in chunk]))
    return photo_ids, owners, np.concatenate(rows)


def text_vectors(model: Any, catalogue: pd.DataFrame, batch: int = 256) -> Embedded:
    rows = catalogue[catalogue["text"].str.strip() != ""]
    texts = rows["text"].tolist()
    chunks = [model.embed(texts=texts[start:start + batch])
              for start in progress_bar(range(0, len(texts), batch), desc="text vectors", unit="batch")]
    return Embedded(rows["listing_id"].tolist(), np.concatenate(chunks))


def exact_index(embedded: Embedded, name: str, encodes: str) -> FaissListingIndex:
    spec = EmbeddingSpec(model_name=name, model_revision="bench", model_type="bench", encodes=encodes,
                         dim=embedded.vectors.shape[1])
    index = FaissListingIndex(spec, kind="exact")
    keep = np.linalg.norm(embedded.vectors, axis=1) > 0.5  # a zero vector has no neighbours to measure
    index.add([listing for listing, kept in zip(embedded.ids, keep) if kept], embedded.vectors[keep])
    return index


def held_out_listings(model: ImageClassifier, db_url: str, images: str) -> set[str] | None:
    """The listings ``model`` was not trained on: its recorded split (seed, default fractions 0.8 / 0.1 / 0.1) rebuilt
    from this data, if it gives the training products the model records; None if it does not."""
    summary = model.data_summary
    if "seed" not in summary or "train_products" not in summary:
        return None
    splits = load_marketplace(db_url, images).split((0.8, 0.1, 0.1), seed=summary["seed"])
    if products_fingerprint(splits["train"].products["product_id"]) != summary["train_products"]:
        return None
    return {str(product) for name in ("val", "test") for product in splits[name].products["product_id"]}


def same_listing_quality(owners: list[str], photo_vectors: np.ndarray,
                         query_listings: set[str] | None) -> list[object]:
    """A photo of ``query_listings`` (None: of any listing) as the query among every photo, itself left out; the
    answers are its listing's other photos (listings with >= 2 photos). recall@k: share of queries with one of them
    in the top k; MRR: mean of 1 / rank of the first one."""
    per_listing = Counter(owners)
    queries = [i for i, owner in enumerate(owners)
               if per_listing[owner] >= 2 and (query_listings is None or owner in query_listings)]
    ranks = same_listing_ranks(photo_vectors, owners, queries, k=K)
    first = np.where(ranks > 0, ranks, np.inf)
    return [len(ranks), f"{np.mean(first <= 1):.3f}", f"{np.mean(ranks > 0):.3f}", f"{np.mean(1 / first):.3f}"]


def category_precision(embedded: Embedded, roots: pd.Series, name: str, encodes: str) -> list[object]:
    """Listing -> listings: the share of each labelled listing's 10 nearest listings (itself left out) that share
    its root category, averaged over the listings."""
    index = exact_index(embedded, name, encodes)
    labelled = [listing for listing in embedded.ids if listing in index and isinstance(roots.get(listing), str)]
    vectors = index.get_vectors(labelled)
    shares = []
    for start in range(0, len(labelled), 256):
        chunk = labelled[start:start + 256]
        found = index.search(vectors[start:start + 256], K, exclude_ids=[[listing] for listing in chunk])
        shares += [np.mean([roots.get(n.listing_id) == roots[listing] for n in neighbours])
                   for listing, neighbours in zip(chunk, found) if neighbours]
    return [len(shares), f"{np.mean(shares):.3f}"]


def padded_index(embedded: Embedded, size: int, spec: EmbeddingSpec, seed: int) -> FaissListingIndex:
    """The real listings' vectors plus synthetic ones (``ClusteredVectors`` of the same dimension) up to ``size``,
    in a default (auto: exact, HNSW above the crossover) index: the size a latency bar is set at."""
    index = FaissListingIndex(spec)
    index.add(embedded.ids, embedded.vectors)
    extra = size - len(embedded.ids)
    if extra > 0:
        index.add(listing_ids(0, extra), ClusteredVectors(spec.dim, seed).all(extra, 0))
    return index


class _Server:
    """uvicorn serving ``app`` on a free loopback port in a thread, as the CLI configures it."""

    def __init__(self, settings: ServingSettings) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> _Server:
        self._thread.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self._server.started and httpx.get(f"{self.url}/ready").status_code == 200:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"the server did not get ready: {httpx.get(f'{self.url}/ready').text}")

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def http_latencies(model_name: str, index: FaissListingIndex, db_url: str, queries: list[dict[str, Any]],
                   endpoint_kind: str) -> list[list[object]]:
    """p50/p99 of ``POST /similar`` (k = 10) over real HTTP, one request at a time, per query kind."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-similar-") as scratch:
        folder = index.save_pretrained(Path(scratch) / "index")
        settings = ServingSettings(**{f"{endpoint_kind}_model": model_name}, index=str(folder), db_url=db_url,
                                   torch_threads=1, max_batch_wait_ms=0)
        with _Server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
            for label, bodies in (("by listing id", [q for q in queries if "listing_id" in q]),
                                  ("by text", [q for q in queries if "text" in q])):
                if not bodies:
                    continue
                for body in bodies[:5]:  # warm up
                    http.post("/similar", json=body).raise_for_status()
                times = []
                for body in bodies:
                    started = time.perf_counter()
                    http.post("/similar", json=body).raise_for_status()
                    times.append((time.perf_counter() - started) * 1000)
                rows.append([label, len(times), f"{np.percentile(times, 50):.1f}", f"{np.percentile(times, 99):.1f}"])
    return rows


def retrieval_quality(args: argparse.Namespace) -> list[str]:
    """Section 4 (the module docstring): same-listing recall, category precision, latencies, build time."""
    with tempfile.TemporaryDirectory(prefix="bench-search-data-") as scratch:
        db_url, where = args.db_url, args.db_url
        if db_url is None:
            db_url = f"sqlite:///{Path(scratch) / 'marketplace.db'}"
            import_csv(args.data / "products.csv", args.data / "images.csv", db_url, progress=False)
            where = f"{args.data} (imported into a temporary SQLite database)"
        store = open_image_store(args.images or str(args.data / "images"))
        catalogue = read_catalogue(open_engine(db_url))
        roots = catalogue.set_index("listing_id")["category"].map(
            lambda category: category.split("/", 1)[0].strip() if isinstance(category, str) else None)
        models_used, embedded, sections = [], {}, []
        build_rows = []
        image_model = text_model = None
        if args.image_model:
            image_model = load_model(args.image_model)
            models_used.append(f"image: `{args.image_model}` ({image_model.model_type}, "
                               f"{getattr(image_model, 'backbone_name', '')}, "
                               f"revision {image_model.source['revision']})")
            started = time.perf_counter()
            photo_ids, owners, features = image_features(image_model, catalogue, store)
            seconds = time.perf_counter() - started
            held_out = held_out_listings(image_model, db_url, args.images or str(args.data / "images"))
            photo_vectors = l2_normalize_rows(features)
            listing_order = list(dict.fromkeys(owners))
            position = {listing: i for i, listing in enumerate(listing_order)}
            listing_vectors = l2_normalize_rows(mean_by_listing(
                features, np.array([position[o] for o in owners]), len(listing_order)))
            embedded["image"] = Embedded(listing_order, listing_vectors)
            build_rows.append(["image (every photo's vector)", len(photo_ids), f"{seconds:.1f}"])
            say("same-listing recall")
            recall = same_listing_quality(owners, photo_vectors, held_out)
            queries_from = ("the listings the image model was not trained on (its validation and test products)"
                            if held_out is not None else "every listing (the image model's training split could not "
                            "be rebuilt from this data, so some queries are listings it was trained on)")
            sections += ["### Same-listing recall (image index of photos)",
                         ("A photo as the query among every photo, by exact cosine similarity (itself left out); the "
                          "answers are the other photos of its listing (listings with >= 2 photos). recall@k: share of "
                          "queries with one of them in the top k; MRR: mean of 1 / rank of the first one within the "
                          f"top 10. Queries: photos of {queries_from}."),
                         table(["queries", "recall@1", "recall@10", "MRR@10"], [recall])]
        if args.text_model:
            text_model = load_model(args.text_model)
            models_used.append(f"text: `{args.text_model}` ({text_model.model_type}, revision "
                               f"{text_model.source['revision']})")
            started = time.perf_counter()
            embedded["text"] = text_vectors(text_model, catalogue)
            build_rows.append(["text", len(embedded["text"].ids), f"{time.perf_counter() - started:.1f}"])
        if args.fusion_model:
            fusion = load_model(args.fusion_model)
            models_used.append(f"fusion: `{args.fusion_model}` (revision {fusion.source['revision']})")
            started = time.perf_counter()
            vectors = []
            for start in progress_bar(range(0, len(catalogue), 64), desc="fusion vectors", unit="batch"):
                rows = catalogue.iloc[start:start + 64]
                encoded = store.get_many([i for ids in rows["image_ids"] for i in ids])
                images = [[load_image(encoded[i], name=i) for i in ids] or None for ids in rows["image_ids"]]
                texts = [text if text.strip() else None for text in rows["text"]]
                keep = [bool(photos) or bool(text) for photos, text in zip(images, texts)]
                vectors.append((rows["listing_id"][keep].tolist(), fusion.embed(
                    images=[p for p, k in zip(images, keep) if k], texts=[t for t, k in zip(texts, keep) if k])))
            embedded["fusion"] = Embedded([i for ids, _ in vectors for i in ids],
                                          np.concatenate([v for _, v in vectors]))
            build_rows.append(["fusion", len(embedded["fusion"].ids), f"{time.perf_counter() - started:.1f}"])
        elif "image" in embedded and "text" in embedded:
            # FusionClassifier.embed: [image part | text part], each part x 1/sqrt(2) when both are present.
            image, text_part = embedded["image"], embedded["text"]
            image_of = dict(zip(image.ids, image.vectors))
            text_of = dict(zip(text_part.ids, text_part.vectors))
            ids = [listing for listing in catalogue["listing_id"] if listing in image_of or listing in text_of]
            zeros_image, zeros_text = np.zeros(image.vectors.shape[1]), np.zeros(text_part.vectors.shape[1])
            rows = [np.concatenate([image_of.get(i, zeros_image), text_of.get(i, zeros_text)]) for i in ids]
            both = np.array([i in image_of and i in text_of for i in ids])
            fused = np.stack(rows).astype(np.float32)
            fused[both] /= np.float32(np.sqrt(2.0))
            embedded["fusion"] = Embedded(ids, fused)
            models_used.append("fusion: the image and text models' vectors joined as `FusionClassifier.embed` joins "
                               "its branches' (a fusion checkpoint of these two branches gives the same vectors)")
        if not embedded:
            return ["## 4. Retrieval quality", "No model given (--image-model, --text-model, --fusion-model)."]
        say("category precision")
        precision_rows = [[kind, *category_precision(vectors, roots, kind, "image+text" if kind == "fusion" else kind)]
                          for kind, vectors in embedded.items()]
        sections += ["### Category precision@10 (listing -> listings)",
                     ("Each labelled listing's 10 nearest listings in the exact index of its kind (itself left "
                      "out): the share with its root category."),
                     table(["vectors", "listings", "precision@10"], precision_rows)]
        # Latency: the model that serves queries, over its real vectors padded with synthetic ones.
        kind = "text" if text_model is not None else "image" if image_model is not None else "fusion"
        served = {"text": args.text_model, "image": args.image_model, "fusion": args.fusion_model}[kind]
        model = load_model(served)
        spec = EmbeddingSpec(model_name=served, model_revision=model.source["revision"], model_type=model.model_type,
                             encodes=model.input_kind, dim=embedded[kind].vectors.shape[1])
        started = time.perf_counter()
        index = padded_index(embedded[kind], args.http_listings, spec, args.seed)
        build_rows.append([f"{kind} index of {len(index):,} listings ({index.structure})", len(index),
                           f"{time.perf_counter() - started:.1f}"])
        rng = np.random.default_rng(args.seed)
        real = rng.choice(embedded[kind].ids, size=min(args.latency_queries, len(embedded[kind].ids)), replace=False)
        p50, p99 = single_thread(latencies_ms, index, index.get_vectors(list(real)))
        say("latency over HTTP")
        queries = [{"listing_id": listing, "k": K} for listing in real]
        if kind == "text":
            texts = catalogue.set_index("listing_id").loc[list(real), "text"]
            queries += [{"text": text, "k": K} for text in texts if text.strip()]
        http_rows = http_latencies(served, index, db_url, queries, "combined" if kind == "fusion" else kind)
        sections += [f"### Query latency, {kind} index of {len(index):,} listings",
                     (f"{len(embedded[kind].ids):,} real listings' vectors padded with synthetic clustered vectors of "
                      f"the same dimension ({spec.dim}) up to {len(index):,}; k = {K}. In process: "
                      f"`FaissListingIndex.search`, one FAISS thread, {len(real)} queries: "
                      f"**p50 {p50:.2f} ms, p99 {p99:.2f} ms**. Over HTTP (`POST /similar`, uvicorn on loopback, one "
                      "request at a time, JSON, answers with the listings' details read from the database; a text "
                      "query is embedded by the served model first):"),
                     table(["query", "requests", "p50 ms", "p99 ms"], http_rows),
                     "### Build time", table(["what", "items", "seconds"], build_rows)]
        return ["## 4. Retrieval quality on real listings", f"Data: {where}: {len(catalogue):,} listings. Models: "
                + "; ".join(models_used) + ".", *sections]


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
    parser.add_argument("--output", type=Path, default=None,
                        help="report file (default reports/bench_search.md, with --skip-scale "
                             "reports/bench_search_retrieval.md)")
    parser.add_argument("--skip-scale", action="store_true", help="run only section 4 (retrieval quality)")
    retrieval = parser.add_argument_group("4. retrieval quality on real listings (runs when a model is given)")
    retrieval.add_argument("--image-model", help="image model: checkpoint name or path (load_model)")
    retrieval.add_argument("--text-model", help="text model: checkpoint name or path")
    retrieval.add_argument("--fusion-model", help="fusion model (default: the image and text models' vectors joined "
                                                  "as FusionClassifier.embed joins its branches')")
    retrieval.add_argument("--data", type=Path, default=benchmark_export_dir(),
                           help="CSV export (products.csv, images.csv, images/), imported into a temporary SQLite "
                                "database (default: %(default)s)")
    retrieval.add_argument("--db-url", default=None, help="read this database instead of importing --data")
    retrieval.add_argument("--images", default=None, help="photos with --db-url (default: <--data>/images)")
    retrieval.add_argument("--http-listings", type=int, default=100_000,
                           help="listings in the index whose latency is measured (real ones padded with synthetic)")
    args = parser.parse_args(argv)
    output = args.output or reports_dir() / ("bench_search_retrieval.md" if args.skip_scale else "bench_search.md")
    command = " ".join(["python scripts/bench_search.py", *(argv if argv is not None else sys.argv[1:])])

    sections = []
    if args.skip_scale:
        args.crossover_dims, args.n, args.pg_n = [], 0, 0
    if args.crossover_dims:
        say("1. exact crossover")
        crossover = exact_crossover(args.crossover_dims, args.crossover_sizes, args.latency_queries, args.seed)
        sections += ["## 1. Exact search: where it stops meeting 5 ms", crossover,
                     (f"`FaissListingIndex` searches exactly while listings x dim <= {EXACT_MAX_COMPONENTS:,} "
                      "(`EXACT_MAX_COMPONENTS`), and builds HNSW above.")]
    if args.n:
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
    if args.image_model or args.text_model or args.fusion_model:
        say("4. retrieval quality")
        sections += retrieval_quality(args)

    header = (f"# Listing search benchmark\n\n"
              f"{datetime.date.today().isoformat()}, {platform.node() or 'machine'}: {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB, FAISS {faiss.__version__}. Command: `{command}`\n\n"
              + ("" if args.skip_scale else
                 f"Vectors: synthetic, clustered (see the script's docstring), L2-normalised; {args.queries} held-out "
                 f"queries for recall, {args.latency_queries} timed one at a time with one FAISS thread."))
    report = "\n\n".join([header.rstrip(), *sections]) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")
    print(report)
    say(f"report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
