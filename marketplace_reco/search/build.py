"""Building and updating a listing index: a model by name + the marketplace database (+ photos) -> an index.

The steps, which ``scripts/build_index.py`` runs in one process or spread over ``torchrun`` ranks:

1. ``read_catalogue`` (catalogue.py) reads every listing; ``plan_update`` compares it with what the index holds:
   listings to embed (new ones, and ``refresh_ids``: listings whose text or photos changed, since the products
   table records no modification time), listings to delete (gone from the database, or without the input the
   model needs), and the rest, left alone;
2. ``embed_listings`` embeds a list of listings in batches (``model.embed``), a shard of it per rank;
3. ``write_vectors`` writes each shard's vectors (upsert), ``finish_update`` deletes the listings to delete.

An index remembers the model (name and revision) that made its vectors; updating it with another model or
revision raises ``ModelMismatchError`` before anything is embedded: rebuild it (``rebuild=True``) instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from .._progress import progress_bar
from ..data.database import open_engine
from ..data.image_store import ImageStore, open_image_store
from ..data.images import load_image
from ..models import CheckpointMixin, load_model
from ..settings import checkpoints_dir
from .base import EmbeddingSpec, ListingIndex
from .catalogue import embeddable, read_catalogue
from .errors import IndexConfigError
from .faiss_index import FaissListingIndex
from .pgvector_index import DEFAULT_NAME, MAX_HNSW_DIM, PgvectorListingIndex

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "pgvector")
#: Listings per ``model.embed`` call: bounds the decoded photos held at once.
DEFAULT_BATCH_SIZE = 64


def embedding_spec(model: CheckpointMixin) -> EmbeddingSpec:
    """What an index built by ``model`` records: its name and revision (as loaded), type, input kind, dimension."""
    if not callable(getattr(model, "embed", None)) or not hasattr(model, "embedding_dim"):
        raise IndexConfigError(f"model type {model.model_type!r} has no embed(): similar-listing search takes a "
                               "torch model (image-classifier, text-cnn, a text transformer, fusion)")
    return EmbeddingSpec(model_name=model.source.get("name") or model.model_type,
                         model_revision=model.source.get("revision") or "in memory",
                         model_type=model.model_type, encodes=model.input_kind, dim=int(model.embedding_dim))


@dataclass(frozen=True)
class UpdatePlan:
    """What an update does: listing ids to embed (and write), to delete, and how many stay as they are."""

    embed: list[str]
    delete: list[str]
    unchanged: int
    #: The listings the index held when the plan was made.
    indexed: frozenset[str] = frozenset()

    def shard(self, rank: int, world_size: int) -> list[str]:
        """The listings rank ``rank`` of ``world_size`` embeds: every world_size-th one, so shards stay even."""
        return self.embed[rank::world_size]


@dataclass
class UpdateReport:
    """What an update did, for the script's summary."""

    added: int = 0
    refreshed: int = 0
    deleted: int = 0
    unchanged: int = 0
    #: Listings the model gave no direction (a zero vector): left out of the index, their ids listed.
    without_vector: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        skipped = f", {len(self.without_vector)} without a vector (left out)" if self.without_vector else ""
        return (f"{self.added} added, {self.refreshed} re-embedded, {self.deleted} deleted, {self.unchanged} "
                f"unchanged{skipped} in {self.seconds:.1f} s")


def plan_update(indexed_ids: Iterable[str], catalogue: pd.DataFrame, encodes: str,
                refresh_ids: Iterable[str] = ()) -> UpdatePlan:
    """Compare the index's listings with the catalogue (see the module docstring)."""
    indexed = set(indexed_ids)
    wanted = catalogue.loc[embeddable(catalogue, encodes), "listing_id"].tolist()
    wanted_set = set(wanted)
    refresh = set(refresh_ids)
    unknown = sorted(refresh - set(catalogue["listing_id"]))
    if unknown:
        raise IndexConfigError(f"refresh: {len(unknown)} listing id(s) not in the products table, e.g. {unknown[:5]}")
    to_embed = [listing_id for listing_id in wanted if listing_id not in indexed or listing_id in refresh]
    to_delete = sorted(indexed - wanted_set)
    return UpdatePlan(embed=to_embed, delete=to_delete,
                      unchanged=len(wanted_set & indexed) - len(refresh & wanted_set & indexed),
                      indexed=frozenset(indexed))


def _model_inputs(model: CheckpointMixin, rows: pd.DataFrame, store: ImageStore) -> dict[str, Any]:
    """The ``embed`` arguments of a batch of catalogue rows: each listing's decoded photos and/or its text."""
    inputs: dict[str, Any] = {}
    if model.input_kind in ("image", "image+text"):
        wanted = [image_id for image_ids in rows["image_ids"] for image_id in image_ids]
        encoded = store.get_many(wanted)
        inputs["images"] = [[load_image(encoded[image_id], name=f"{image_id} from {store.location}")
                             for image_id in image_ids] or None for image_ids in rows["image_ids"]]
    if model.input_kind in ("text", "image+text"):
        inputs["texts"] = [text if text and text.strip() else None for text in rows["text"]]
    return inputs


def embed_listings(model: CheckpointMixin, catalogue: pd.DataFrame, listing_ids: Sequence[str], store: ImageStore,
                   *, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                   desc: str = "embed listings") -> tuple[list[str], np.ndarray, list[str]]:
    """Embed ``listing_ids`` (rows of ``catalogue``) in batches: (ids, ``[n, dim]`` unit vectors, ids left out).

    A listing whose vector is zero (the model's features gave it no direction) is left out and listed.
    """
    dim = int(model.embedding_dim)
    rows = catalogue.set_index("listing_id").loc[list(listing_ids)].reset_index()
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    without_vector: list[str] = []
    with progress_bar(total=len(rows), desc=desc, unit="listing", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows.iloc[start:start + batch_size]
            vectors = model.embed(**_model_inputs(model, batch, store))
            has_direction = np.linalg.norm(vectors, axis=1) > 0.5
            batch_ids = batch["listing_id"].tolist()
            ids += [listing_id for listing_id, keep in zip(batch_ids, has_direction) if keep]
            without_vector += [listing_id for listing_id, keep in zip(batch_ids, has_direction) if not keep]
            chunks.append(vectors[has_direction])
            bar.update(len(batch))
    if without_vector:
        logger.warning("%d listing(s) got a zero vector from the model and are left out of the index, e.g. %s",
                       len(without_vector), without_vector[:5])
    return ids, (np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)), without_vector


def write_vectors(index: ListingIndex, ids: Sequence[str], vectors: np.ndarray) -> None:
    """Write embedded listings into the index (``upsert``: new ones added, refreshed ones replaced). Under torchrun
    every rank may call it with its own shard on a pgvector index."""
    if len(ids):
        index.upsert(list(ids), vectors)


def finish_update(index: ListingIndex, plan: UpdatePlan, written_ids: Sequence[str],
                  without_vector: Sequence[str] = (), *, build_hnsw: bool = False) -> UpdateReport:
    """After every shard is written: delete the plan's deletions, and listings of the index that now have no
    vector; with ``build_hnsw``, build the HNSW graph of a pgvector index created exact for its first load (once,
    faster than growing it row by row; vectors wider than pgvector's HNSW limit stay exact, with a warning); report
    what changed (once, on one rank)."""
    refreshed = sum(listing_id in plan.indexed for listing_id in written_ids)
    to_delete = sorted(set(plan.delete) | (set(without_vector) & plan.indexed))
    if to_delete:
        index.delete(to_delete)
    if build_hnsw and isinstance(index, PgvectorListingIndex) and index.kind == "exact":
        if index.embedding.dim > MAX_HNSW_DIM:
            # Refusing here would throw away every vector just embedded; an exact index still answers.
            logger.warning("the pgvector index %r stays exact (each query scans every row): pgvector's HNSW index "
                           "takes at most %d dimensions and %s's vectors have %d; the FAISS backend has no such "
                           "limit", index.name, MAX_HNSW_DIM, index.embedding.model_name, index.embedding.dim)
        else:
            index.build_hnsw()
    return UpdateReport(added=len(written_ids) - refreshed, refreshed=refreshed, deleted=len(to_delete),
                        unchanged=plan.unchanged, without_vector=list(without_vector))


def index_folder(target: str | Path) -> Path:
    """Where a FAISS index named ``target`` is saved: a bare name goes under the checkpoints folder (where
    ``FaissListingIndex.from_pretrained(name)`` finds it), anything with a path separator is a folder."""
    target = str(target)
    return Path(target) if "/" in target or target.startswith(".") else checkpoints_dir() / target


def open_or_create_index(spec: EmbeddingSpec, *, backend: str = "faiss", target: str | None = None,
                         engine: Engine | None = None, kind: str | None = None,
                         rebuild: bool = False) -> ListingIndex:
    """The index to update: the existing one at ``target`` (a FAISS folder or name, or the pgvector table name in
    ``engine``'s database) checked against ``spec``'s model, or a new empty one (``rebuild``: always new)."""
    if backend not in BACKENDS:
        raise IndexConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pgvector":
        if engine is None:
            raise IndexConfigError("the pgvector backend needs the database engine of the products table")
        name = target or DEFAULT_NAME
        if not rebuild:
            try:
                index: ListingIndex = PgvectorListingIndex.open(engine, name)
            except IndexConfigError:
                logger.info("no listing index %r in the database yet: creating it", name)
            else:
                index.check_model(spec.model_name, spec.model_revision)
                return index
        # Without a kind: exact for the first load, the HNSW graph built after it (finish_update's build_hnsw).
        return PgvectorListingIndex.create(engine, spec, name=name, kind=kind or "exact", replace=rebuild)
    if target is None:
        raise IndexConfigError("the FAISS backend needs a target: an index name or folder to save it to")
    folder = index_folder(target)
    if not rebuild and (folder / "config.json").is_file():
        index = FaissListingIndex.from_pretrained(str(folder))
        index.check_model(spec.model_name, spec.model_revision)
        return index
    return FaissListingIndex(spec, kind=kind or "auto")


def build_index(model: str | CheckpointMixin, *, db_url: str | None = None, image_location: str | None = None,
                backend: str = "faiss", target: str | None = None, model_revision: str | None = None,
                kind: str | None = None, rebuild: bool = False, refresh_ids: Iterable[str] = (),
                batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> tuple[ListingIndex, UpdateReport]:
    """Build or update the index of ``model`` (a name as ``load_model`` takes, or a loaded model) over the
    listings of ``db_url``, in one process; a FAISS index is saved to ``target`` (``index_folder``).

    An existing index is updated incrementally: only new listings and ``refresh_ids`` are embedded.
    """
    started = time.perf_counter()
    if isinstance(model, str):
        model = load_model(model, revision=model_revision)
    spec = embedding_spec(model)
    engine = open_engine(db_url)
    try:
        index = open_or_create_index(spec, backend=backend, target=target, engine=engine, kind=kind,
                                     rebuild=rebuild)
        catalogue = read_catalogue(engine)
        plan = plan_update(index.listing_ids(), catalogue, spec.encodes, refresh_ids)
        ids, vectors, without_vector = embed_listings(model, catalogue, plan.embed, open_image_store(image_location),
                                                      batch_size=batch_size, progress=progress)
        write_vectors(index, ids, vectors)
        report = finish_update(index, plan, ids, without_vector, build_hnsw=backend == "pgvector" and kind is None)
        if isinstance(index, FaissListingIndex):
            index.save_pretrained(index_folder(target))  # type: ignore[arg-type]
    finally:
        if backend != "pgvector":  # a pgvector index keeps using the engine: it lives in that database
            engine.dispose()
    report.seconds = time.perf_counter() - started
    return index, report


def load_index(name: str, *, db_url: str | None = None, revision: str | None = None) -> ListingIndex:
    """An index by name: ``pgvector:<table>`` in the database of ``db_url`` (the products' database), otherwise a
    FAISS index as ``FaissListingIndex.from_pretrained`` resolves it (a name under the checkpoints folder, a
    folder, ``s3://...`` or a Hugging Face repo id)."""
    if name.startswith("pgvector:"):
        return PgvectorListingIndex.open(open_engine(db_url), name.removeprefix("pgvector:") or DEFAULT_NAME)
    return FaissListingIndex.from_pretrained(name, revision=revision)
