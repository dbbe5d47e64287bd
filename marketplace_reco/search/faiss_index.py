"""The embedded backend: FAISS in process, exact up to a measured size and HNSW above it.

Structure. Rows are appended and never renumbered between compactions: FAISS id = row number. Exact search is
``IndexFlatIP``; approximate search is ``IndexHNSWFlat`` (inner product). With ``kind="auto"`` (the default) the
index stays exact while ``listings x dim <= exact_max_components`` and builds an HNSW graph once, inside the
``add``/``upsert`` that crosses it (about 600 vectors a second at dim 384 on two busy cores, so seconds at the
crossover: see reports/bench_search.md); it never goes back to exact by itself. ``kind="exact"`` or ``"hnsw"``
fixes the structure.

Updates without a rebuild. ``add`` appends rows (HNSW links them into the graph). ``delete`` marks rows deleted
(a tombstone) and searches skip them through a FAISS ID selector; HNSW cannot remove nodes, and a deleted node
still routes searches. ``upsert`` is a delete of the old row plus an add. Compaction (dropping deleted rows, so
renumbering) happens automatically for the exact structure when deleted rows pass a quarter of the stored rows
(a copy of the vectors: cheap), and for HNSW only when ``compact()`` is called, because it rebuilds the graph
(29 minutes for a million vectors of dim 384 here): call it when ``deleted_rows`` has grown large, e.g. after a
nightly re-embedding.

Filters. The FAISS backend takes ``SearchFilters.allowed_ids`` only (the API resolves category, price and location
filters to an allow-list from the database). When the allowed listings are few enough for exact search
(``allowed x dim <= exact_max_components``) they are compared exhaustively; otherwise HNSW searches with the
allow-list as a selector and any query that comes back short is repeated exactly. Excluded ids (a query's own
listing) are over-fetched and dropped, so ``k`` results come back whenever ``k`` listings qualify.

Saved as a checkpoint-style folder (``save_pretrained``/``from_pretrained``/``push_to_hub``): see ``index_card.md``.
The HNSW graph is saved (FAISS's serialisation, without the vectors that are saved beside it) rather than rebuilt
at load: loading a million vectors of dim 384 takes 12 s that way, rebuilding the graph 29 minutes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ._checkpoint_io import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    ResolvedCheckpoint,
    push_checkpoint,
    read_config,
    resolve_checkpoint,
)
from .base import EmbeddingSpec, ListingIndex, Neighbour, SearchFilters
from .errors import DuplicateListingError, IndexConfigError, IndexFileError, IndexInputError, UnknownListingError
from .persistence import read_arrays, render_card, write_arrays

MODEL_TYPE = "listing-index"
# The models' read_config (which pushing and loading go through) refuses versions above the models' own (2).
FORMAT_VERSION = 1
KINDS = ("auto", "exact", "hnsw")
#: Exact search while listings x dim stays at or below this: one exhaustive query over about 8M float32
#: components (32 MB) takes 2 to 6 ms p50 on one busy core (reports/bench_search.md, section 1).
EXACT_MAX_COMPONENTS = 8_000_000
#: HNSW defaults, chosen in reports/bench_search.md: at 1,000,000 vectors of dim 384, recall@10 0.998 against
#: exact at 0.5 ms p50. With efConstruction 64 the graph was built 2.4 times faster but recall stalled at 0.945
#: whatever efSearch (reports/bench_search_efc64.md).
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 64
# The exact structure compacts itself once deleted rows pass this fraction of the stored rows.
_EXACT_COMPACTION_FRACTION = 0.25


class FaissListingIndex(ListingIndex):
    """A listing index held in memory by FAISS (see the module docstring for structure, updates and filters)."""

    def __init__(self, embedding: EmbeddingSpec, *, kind: str = "auto", hnsw_m: int = DEFAULT_HNSW_M,
                 ef_construction: int = DEFAULT_EF_CONSTRUCTION, ef_search: int = DEFAULT_EF_SEARCH,
                 exact_max_components: int = EXACT_MAX_COMPONENTS) -> None:
        if kind not in KINDS:
            raise IndexConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction), ("ef_search", ef_search),
                            ("exact_max_components", exact_max_components)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IndexConfigError(f"{name} must be a positive integer, got {value!r}")
        self.embedding = embedding
        self.kind = kind
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.exact_max_components = exact_max_components
        #: Where the index was loaded from: {"name", "revision", "folder"}; empty for an index built in memory.
        self.source: dict[str, str] = {}
        self._reset(approximate=kind == "hnsw")

    # ---- state ---------------------------------------------------------------------------------------------
    def _reset(self, *, approximate: bool) -> None:
        """An empty structure: no rows."""
        dim = self.embedding.dim
        if approximate:
            self._index: faiss.Index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = self.ef_construction
            self._storage = faiss.downcast_index(self._index.storage)
        else:
            self._index = faiss.IndexFlatIP(dim)
            self._storage = self._index
        self._row_ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._deleted = np.zeros(0, dtype=bool)
        self._live_selection: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def structure(self) -> str:
        """The structure searched now: ``"exact"`` or ``"hnsw"``."""
        return "hnsw" if isinstance(self._index, faiss.IndexHNSW) else "exact"

    @property
    def rows(self) -> int:
        """Stored rows, deleted ones included."""
        return len(self._row_ids)

    @property
    def deleted_rows(self) -> int:
        """Rows marked deleted and not yet compacted away."""
        return self.rows - len(self._row_of)

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, listing_id: object) -> bool:
        return listing_id in self._row_of

    def listing_ids(self) -> list[str]:
        return list(self._row_of)

    def _stored_vectors(self) -> np.ndarray:
        """A view (no copy) of every stored row's vector, ``[rows, dim]``; valid until the index changes."""
        if self.rows == 0:
            return np.empty((0, self.embedding.dim), dtype=np.float32)
        flat = faiss.rev_swig_ptr(self._storage.get_xb(), self.rows * self.embedding.dim)
        return flat.reshape(self.rows, self.embedding.dim)

    # ---- updates -------------------------------------------------------------------------------------------
    def _write(self, ids: list[str], vectors: np.ndarray, *, replace: bool) -> None:
        present = [listing_id for listing_id in ids if listing_id in self._row_of]
        if present and not replace:
            raise DuplicateListingError(present, "are in the index already (upsert replaces their vectors)")
        self._mark_deleted(present)
        self._append(ids, vectors)

    def _delete(self, ids: list[str]) -> None:
        unknown = [listing_id for listing_id in ids if listing_id not in self._row_of]
        if unknown:
            raise UnknownListingError(unknown, "the index")
        self._mark_deleted(ids)
        if self.structure == "exact" and self.deleted_rows > _EXACT_COMPACTION_FRACTION * self.rows:
            self.compact()

    def _mark_deleted(self, ids: list[str]) -> None:
        rows = [self._row_of.pop(listing_id) for listing_id in ids]
        self._deleted[rows] = True
        self._live_selection = None

    def _append(self, ids: list[str], vectors: np.ndarray) -> None:
        first = self.rows
        if self.kind == "auto" and self.structure == "exact" and \
                (len(self) + len(ids)) * self.embedding.dim > self.exact_max_components:
            self._rebuild(approximate=True, extra=(ids, vectors))
            return
        self._index.add(vectors)
        self._row_ids.extend(ids)
        self._row_of.update(zip(ids, range(first, first + len(ids))))
        self._deleted = np.concatenate([self._deleted, np.zeros(len(ids), dtype=bool)])
        self._live_selection = None

    def compact(self) -> None:
        """Drop deleted rows, rebuilding the structure from the live vectors (for HNSW: the whole graph)."""
        self._rebuild(approximate=self.structure == "hnsw")

    def _rebuild(self, *, approximate: bool, extra: tuple[list[str], np.ndarray] | None = None) -> None:
        """Rebuild from the live rows (plus ``extra`` new ones) into a new exact or HNSW structure."""
        live = np.flatnonzero(~self._deleted)
        vectors = self._stored_vectors()[live]  # a copy, so the old structure can go before the new one fills
        ids = [self._row_ids[row] for row in live]
        if extra is not None:
            ids += extra[0]
            vectors = np.concatenate([vectors, extra[1]])
        self._reset(approximate=approximate)
        self._fill(ids, vectors)

    def _fill(self, ids: list[str], vectors: np.ndarray) -> None:
        """Make ``ids`` and ``vectors`` the rows of the (empty) structure just reset."""
        self._index.add(vectors)
        self._row_ids = list(ids)
        self._row_of = dict(zip(ids, range(len(ids))))
        self._deleted = np.zeros(len(ids), dtype=bool)

    # ---- reading -------------------------------------------------------------------------------------------
    def _get_vectors(self, ids: list[str]) -> np.ndarray:
        unknown = [listing_id for listing_id in ids if listing_id not in self._row_of]
        if unknown:
            raise UnknownListingError(unknown, "the index")
        return self._stored_vectors()[[self._row_of[listing_id] for listing_id in ids]]

    def _search(self, queries: np.ndarray, k: int, exclusions: list[frozenset[str]],
                filters: SearchFilters | None) -> list[list[Neighbour]]:
        if filters is not None and filters.database_filters:
            raise IndexInputError(
                f"the FAISS backend cannot filter by {', '.join(filters.database_filters)}: resolve them to "
                "SearchFilters.allowed_ids from the products table, or use the pgvector backend"
            )
        allowed_ids = filters.allowed_ids if filters is not None else None
        eligible, bitmap = self._selection(allowed_ids)
        n_eligible = len(self) if allowed_ids is None else int(eligible.sum())
        excluded_rows = [self._rows_in(excluded, eligible) for excluded in exclusions]
        fetch = min(k + max(len(rows) for rows in excluded_rows), n_eligible)
        if fetch == 0:
            return [[] for _ in queries]
        # ``bitmap`` stays referenced while FAISS reads it through the selector.
        selector = None if bitmap is None else faiss.IDSelectorBitmap(self.rows, faiss.swig_ptr(bitmap))
        exact = self.structure == "exact" or n_eligible * self.embedding.dim <= self.exact_max_components
        scores, rows = self._search_rows(queries, fetch, selector, exact=exact)
        results = []
        for position, excluded in enumerate(excluded_rows):
            found = self._neighbours(scores[position], rows[position], excluded, k)
            # HNSW under a selector can miss qualifying rows; an exact pass over the same selection cannot.
            if len(found) < min(k, n_eligible - len(excluded)) and not exact:
                exact_scores, exact_rows = self._search_rows(queries[position:position + 1], fetch, selector,
                                                             exact=True)
                found = self._neighbours(exact_scores[0], exact_rows[0], excluded, k)
            results.append(found)
        return results

    def _selection(self, allowed_ids: frozenset[str] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Rows a search may return, as a boolean mask and FAISS's bitmap of it; (None, None) when every stored
        row may. The selection of live rows is kept until the next update (packing it costs O(rows))."""
        if allowed_ids is None:
            if not self.deleted_rows:
                return None, None
            if self._live_selection is None:
                live = ~self._deleted
                self._live_selection = live, np.packbits(live, bitorder="little")
            return self._live_selection
        eligible = np.zeros(self.rows, dtype=bool)
        eligible[[self._row_of[listing_id] for listing_id in allowed_ids if listing_id in self._row_of]] = True
        return eligible, np.packbits(eligible, bitorder="little")

    def _rows_in(self, ids: frozenset[str], eligible: np.ndarray | None) -> set[int]:
        rows = {self._row_of[listing_id] for listing_id in ids if listing_id in self._row_of}
        return rows if eligible is None else {row for row in rows if eligible[row]}

    def _search_rows(self, queries: np.ndarray, fetch: int, selector: faiss.IDSelector | None, *,
                     exact: bool) -> tuple[np.ndarray, np.ndarray]:
        if exact:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            return self._storage.search(queries, fetch, params=params)
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, fetch))
        if selector is not None:
            params.sel = selector
        return self._index.search(queries, fetch, params=params)

    def _neighbours(self, scores: np.ndarray, rows: np.ndarray, excluded: set[int], k: int) -> list[Neighbour]:
        found = [Neighbour(self._row_ids[row], float(score))
                 for score, row in zip(scores, rows) if row >= 0 and row not in excluded]
        return found[:k]

    # ---- saving and loading --------------------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        """The constructor's settings, as ``config.json`` keeps them."""
        return {"kind": self.kind, "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search, "exact_max_components": self.exact_max_components}

    @property
    def config(self) -> dict[str, Any]:
        """The content of ``config.json``."""
        return {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, "backend": "faiss",
                **self.embedding.to_config(), "settings": self.settings, "structure": self.structure,
                "rows": self.rows, "listings": len(self)}

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` into the folder; return it.

        The exact structure is compacted first (cheap); an HNSW index is saved with its deleted rows, which its
        graph still links.
        """
        if self.structure == "exact" and self.deleted_rows:
            self.compact()
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        encoded = [listing_id.encode("utf-8") for listing_id in self._row_ids]
        arrays = {
            "vectors": self._stored_vectors(),
            "deleted": self._deleted.astype(np.uint8),
            "id_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8),
            "id_offsets": np.concatenate([[0], np.cumsum([len(raw) for raw in encoded], dtype=np.int64)]),
        }
        if self.structure == "hnsw":
            writer = faiss.VectorIOWriter()
            faiss.write_index(self._index, writer, faiss.IO_FLAG_SKIP_STORAGE)
            arrays["hnsw_graph"] = faiss.vector_to_array(writer.data)
        write_arrays(folder / WEIGHTS_FILE, arrays)
        config = self.config
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / CARD_FILE).write_text(render_card({
            **config, "model_name": self.embedding.model_name, "model_revision": self.embedding.model_revision,
            "model_type": self.embedding.model_type}), encoding="utf-8")
        return folder

    def push_to_hub(self, target: str, revision: str | None = None) -> str:
        """Save to a temporary folder and push it to ``target`` (a local name or folder, ``s3://bucket/prefix/name``
        or a Hugging Face ``org/repo``), like a model; return the resolved revision."""
        with tempfile.TemporaryDirectory(prefix="marketplace-reco-index-") as tmp:
            return push_checkpoint(self.save_pretrained(Path(tmp) / "index"), target, revision=revision)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | ResolvedCheckpoint, *,
                        revision: str | None = None) -> FaissListingIndex:
        """Load from a name in the checkpoints folder, a folder, ``s3://...`` or a Hugging Face repo id."""
        resolved = name_or_path
        if not isinstance(resolved, ResolvedCheckpoint):
            resolved = resolve_checkpoint(str(name_or_path), revision=revision)
        folder = resolved.folder
        config = read_config(folder)
        where = str(folder / CONFIG_FILE)
        if config["model_type"] != MODEL_TYPE or config.get("backend") != "faiss":
            raise IndexFileError(f"{where}: model_type {config['model_type']!r} backend {config.get('backend')!r} "
                                 f"is not a FAISS listing index ({MODEL_TYPE!r}, 'faiss')")
        try:
            embedding = EmbeddingSpec.from_config(config, where)
            index = cls(embedding, **config["settings"])
            rows, structure = int(config["rows"]), config["structure"]
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFileError(f"{where}: not a usable listing index configuration ({exc})") from exc
        if structure not in ("exact", "hnsw"):
            raise IndexFileError(f"{where}: unknown structure {structure!r}")
        expected = {"vectors": (np.float32, (rows, embedding.dim)), "deleted": (np.uint8, (rows,)),
                    "id_bytes": (np.uint8, (None,)), "id_offsets": (np.int64, (rows + 1,))}
        if structure == "hnsw":
            expected["hnsw_graph"] = (np.uint8, (None,))
        arrays = read_arrays(folder / WEIGHTS_FILE, expected)
        index._restore(arrays, folder / WEIGHTS_FILE)
        if len(index) != config.get("listings"):
            raise IndexFileError(f"{where}: says {config.get('listings')} listings, the arrays hold {len(index)}")
        index.source = {"name": resolved.name, "revision": resolved.revision, "folder": str(folder)}
        return index

    def _restore(self, arrays: dict[str, np.ndarray], path: Path) -> None:
        """Fill an empty index from checked arrays."""
        offsets = arrays["id_offsets"]
        raw = arrays["id_bytes"].tobytes()
        if offsets[0] != 0 or offsets[-1] != len(raw) or np.any(np.diff(offsets) <= 0):
            raise IndexFileError(f"{path}: id_offsets do not split id_bytes into non-empty ids")
        try:
            ids = [raw[start:end].decode("utf-8") for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        except UnicodeDecodeError as exc:
            raise IndexFileError(f"{path}: a listing id is not UTF-8 ({exc})") from None
        deleted = arrays["deleted"].astype(bool)
        live = [listing_id for listing_id, gone in zip(ids, deleted) if not gone]
        if len(set(live)) != len(live):
            raise IndexFileError(f"{path}: a listing id appears on more than one live row")
        vectors = arrays.pop("vectors")
        if "hnsw_graph" in arrays:
            reader = faiss.VectorIOReader()
            faiss.copy_array_to_vector(arrays["hnsw_graph"], reader.data)
            try:
                graph = faiss.read_index(reader, faiss.IO_FLAG_SKIP_STORAGE)
            except RuntimeError as exc:
                raise IndexFileError(f"{path}: hnsw_graph is not a FAISS HNSW graph ({exc})") from None
            if not isinstance(graph, faiss.IndexHNSWFlat) or graph.ntotal != len(ids) or \
                    graph.d != self.embedding.dim:
                raise IndexFileError(f"{path}: hnsw_graph does not describe {len(ids)} vectors of dim "
                                     f"{self.embedding.dim}")
            storage = faiss.IndexFlatIP(self.embedding.dim)
            storage.add(vectors)
            # The graph takes ownership of the storage, as an index built in memory owns its own.
            graph.storage = storage
            storage.this.disown()
            graph.own_fields = True
            self._index, self._storage = graph, storage
        else:
            self._reset(approximate=False)
            self._index.add(vectors)
        self._row_ids = ids
        self._row_of = {listing_id: row for row, listing_id in enumerate(ids) if not deleted[row]}
        self._deleted = deleted
        self._live_selection = None
