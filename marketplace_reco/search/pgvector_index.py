"""The scale-out backend: PostgreSQL with the pgvector extension, beside the users' ``products`` table.

Layout. Each index is one table, ``listing_embeddings`` by default (``product_id`` referencing ``products.id``,
deleted with its product; ``embedding vector(dim)``), with an HNSW index (``vector_ip_ops``: inner product) when
its kind is ``"hnsw"``. A table per index, not a model column in one shared table, because a ``vector(dim)``
column and its HNSW index have one dimension. The small table ``listing_indexes`` records, per index, the model
(name, revision, type) that made the vectors, what they encode, the dimension and the HNSW settings, so an index
opened by name knows its model and ``check_model`` works as for FAISS.

Building. ``create`` makes an empty index; ``add``/``upsert`` stream rows in by binary COPY through a temporary
staging table, so unknown products and (for ``add``) ids already present are reported in bulk before anything is
written. For a first large load, create with ``kind="exact"``, add everything, then ``build_hnsw()``: building the
graph once, in parallel, is faster than growing it row by row (reports/bench_search.md). Later adds, updates and
deletes go straight into the table and its HNSW index (pgvector updates it incrementally; VACUUM reclaims deleted
rows).

Search. One SQL query per query vector, ``ORDER BY embedding <#> :query LIMIT k``, with ``hnsw.ef_search`` raised
to at least ``k`` plus the exclusions. Filters (category path prefix, price range, location substring, allow-list)
join ``products`` in SQL. pgvector 0.6's HNSW scan yields at most ``ef_search`` candidates before the filters
apply, so a filtered query that comes back with fewer than ``k`` rows is run again exactly (sequential scan of the
filtered rows), which gives ``k`` rows whenever ``k`` listings qualify.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from pgvector.sqlalchemy import VECTOR
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    any_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import SQLAlchemyError

from ..data.database import describe_db_error, mask_url
from ..data.schema import products
from .base import EmbeddingSpec, ListingIndex, Neighbour, SearchFilters
from .errors import DuplicateListingError, IndexConfigError, SearchError, UnknownListingError

DEFAULT_NAME = "listing_embeddings"
KINDS = ("exact", "hnsw")
#: m and ef_construction are pgvector's defaults: recall@10 0.99 against exact at 100,000 vectors
#: (reports/bench_search.md). ef_search is 100 rather than pgvector's 40: the same recall there for 0.3 ms more,
#: and a margin for larger tables.
DEFAULT_HNSW_M = 16
DEFAULT_EF_CONSTRUCTION = 64
DEFAULT_EF_SEARCH = 100
#: pgvector's limits: ``hnsw.ef_search`` at most 1000, an HNSW index over at most 2000 dimensions.
MAX_EF_SEARCH = 1000
MAX_HNSW_DIM = 2000
# Lower-case identifiers, short enough for PostgreSQL's 63 characters once "_hnsw" is appended.
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,57}")
# A PostgreSQL memory setting such as 512MB or 2GB.
_MEMORY = re.compile(r"\d+\s*(kB|MB|GB)")
# Rows per COPY: bounds the memory of a bulk load to a few tens of MB.
_COPY_ROWS = 10_000
# Vectors up to this dimension are stored inline (STORAGE PLAIN; a row must fit an 8 kB page): out-of-line TOAST
# storage, PostgreSQL's default above 2 kB, made an exact scan of 5,000 vectors of dim 1280 take 53 ms.
_INLINE_MAX_DIM = 1500
# Writes of at least this many rows refresh the table's statistics, without which the planner may prefer a
# sequential scan to the HNSW index.
_ANALYZE_AFTER_ROWS = 1_000
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)

_metadata = MetaData()
listing_indexes = Table(
    "listing_indexes",
    _metadata,
    Column("name", String(63), primary_key=True),
    Column("model_name", Text, nullable=False),
    Column("model_revision", Text, nullable=False),
    Column("model_type", Text, nullable=False),
    Column("encodes", Text, nullable=False),
    Column("dim", Integer, nullable=False),
    Column("metric", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("hnsw_m", Integer, nullable=False),
    Column("ef_construction", Integer, nullable=False),
    Column("ef_search", Integer, nullable=False),
)


def _embeddings_table(name: str, dim: int) -> Table:
    """The table of one index (in a MetaData of its own: the dimension is the index's)."""
    return Table(
        name,
        MetaData(),
        Column("product_id", products.c.id.type, ForeignKey(products.c.id, ondelete="CASCADE"), primary_key=True),
        Column("embedding", VECTOR(dim), nullable=False),
    )


def _hnsw_index(table: Table, hnsw_m: int, ef_construction: int) -> Index:
    return Index(f"{table.name}_hnsw", table.c.embedding, postgresql_using="hnsw",
                 postgresql_with={"m": hnsw_m, "ef_construction": ef_construction},
                 postgresql_ops={"embedding": "vector_ip_ops"})


class PgvectorListingIndex(ListingIndex):
    """A listing index in PostgreSQL (see the module docstring); make one with ``create``, reopen it with ``open``."""

    def __init__(self, engine: Engine, name: str, embedding: EmbeddingSpec, *, kind: str, hnsw_m: int,
                 ef_construction: int, ef_search: int) -> None:
        _check_engine(engine)
        _check_settings(name, embedding, kind, hnsw_m, ef_construction, ef_search)
        self.engine = engine
        self.name = name
        self.embedding = embedding
        self.kind = kind
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        #: The HNSW candidate list of a search (``hnsw.ef_search``); raised per query to k plus the exclusions.
        self.ef_search = ef_search
        self.table = _embeddings_table(name, embedding.dim)
        self._where = f"listing index {name!r} in database {mask_url(engine.url)}"

    # ---- creating and opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, engine: Engine, embedding: EmbeddingSpec, *, name: str = DEFAULT_NAME, kind: str = "hnsw",
               hnsw_m: int = DEFAULT_HNSW_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
               ef_search: int = DEFAULT_EF_SEARCH, replace: bool = False) -> PgvectorListingIndex:
        """Create an empty index ``name`` for ``embedding`` (the ``products`` table must exist).

        An index of that name already there is an error, unless ``replace`` drops it first (e.g. to re-embed
        every listing with a new model revision).
        """
        index = cls(engine, name, embedding, kind=kind, hnsw_m=hnsw_m, ef_construction=ef_construction,
                    ef_search=ef_search)
        with index._transaction("create") as conn:
            try:
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
            except SQLAlchemyError as exc:
                raise IndexConfigError(
                    f"database {mask_url(engine.url)} cannot enable the pgvector extension "
                    f"({describe_db_error(exc)}): install pgvector on the server, or have a superuser run "
                    "CREATE EXTENSION vector"
                ) from exc
            if not inspect(conn).has_table(products.name):
                raise IndexConfigError(f"database {mask_url(engine.url)} has no {products.name!r} table: create "
                                       "the schema (marketplace_reco.data.schema.create_schema) and import listings")
            listing_indexes.create(conn, checkfirst=True)
            existing = conn.execute(select(listing_indexes).where(listing_indexes.c.name == name)).mappings().first()
            if existing is not None:
                if not replace:
                    raise IndexConfigError(
                        f"{index._where} exists already (model {existing['model_name']!r} revision "
                        f"{existing['model_revision']!r}): open it, or create with replace=True to drop it")
                index._drop(conn)
            index.table.create(conn)
            if embedding.dim <= _INLINE_MAX_DIM:
                conn.execute(text(f'ALTER TABLE "{name}" ALTER COLUMN embedding SET STORAGE PLAIN'))
            if kind == "hnsw":
                _hnsw_index(index.table, hnsw_m, ef_construction).create(conn)
            conn.execute(insert(listing_indexes).values(name=name, **index._metadata_row()))
        return index

    @classmethod
    def open(cls, engine: Engine, name: str = DEFAULT_NAME) -> PgvectorListingIndex:
        """The index ``name`` as ``create`` (and later changes) left it."""
        _check_engine(engine)
        try:
            with engine.connect() as conn:
                row = None
                if inspect(conn).has_table(listing_indexes.name):
                    row = conn.execute(select(listing_indexes).where(listing_indexes.c.name == name)).mappings().first()
        except SQLAlchemyError as exc:
            raise SearchError(f"cannot read listing index {name!r} from database {mask_url(engine.url)}: "
                              f"{describe_db_error(exc)}") from exc
        if row is None:
            raise IndexConfigError(f"no listing index {name!r} in database {mask_url(engine.url)}: "
                                   "create it with PgvectorListingIndex.create")
        embedding = EmbeddingSpec.from_config(
            {"embedding_model": {"name": row["model_name"], "revision": row["model_revision"],
                                 "model_type": row["model_type"]},
             "encodes": row["encodes"], "dim": row["dim"], "metric": row["metric"]},
            f"listing_indexes row {name!r}")
        return cls(engine, name, embedding, kind=row["kind"], hnsw_m=row["hnsw_m"],
                   ef_construction=row["ef_construction"], ef_search=row["ef_search"])

    def _metadata_row(self) -> dict[str, Any]:
        config = self.embedding.to_config()
        return {"model_name": self.embedding.model_name, "model_revision": self.embedding.model_revision,
                "model_type": self.embedding.model_type, "encodes": self.embedding.encodes,
                "dim": self.embedding.dim, "metric": config["metric"], "kind": self.kind, "hnsw_m": self.hnsw_m,
                "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    def drop(self) -> None:
        """Delete the index: its table and its row in ``listing_indexes``."""
        with self._transaction("drop") as conn:
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        self.table.drop(conn, checkfirst=True)
        conn.execute(delete(listing_indexes).where(listing_indexes.c.name == self.name))

    def build_hnsw(self, *, maintenance_work_mem: str = "1GB", parallel_workers: int = 1) -> None:
        """Build the HNSW index over the rows now in the table (kind becomes ``"hnsw"``).

        ``maintenance_work_mem`` should hold the whole graph (about rows x (4 x dim + 16 x m) bytes) or the build
        slows down sharply; ``parallel_workers`` are PostgreSQL's parallel maintenance workers besides the leader.
        """
        if not _MEMORY.fullmatch(maintenance_work_mem):
            raise IndexConfigError(f"maintenance_work_mem must look like 512MB or 2GB, got {maintenance_work_mem!r}")
        if isinstance(parallel_workers, bool) or not isinstance(parallel_workers, int) or parallel_workers < 0:
            raise IndexConfigError(f"parallel_workers must be an integer >= 0, got {parallel_workers!r}")
        _check_hnsw_dim(self.embedding.dim)
        with self._transaction("build the HNSW index of") as conn:
            conn.execute(text(f"SET LOCAL maintenance_work_mem = '{maintenance_work_mem}'"))
            conn.execute(text(f"SET LOCAL max_parallel_maintenance_workers = {parallel_workers}"))
            if self.kind != "hnsw":
                _hnsw_index(self.table, self.hnsw_m, self.ef_construction).create(conn)
            else:
                conn.execute(text(f'REINDEX INDEX "{self.table.name}_hnsw"'))
            conn.execute(text(f'ANALYZE "{self.table.name}"'))
            conn.execute(listing_indexes.update().where(listing_indexes.c.name == self.name).values(kind="hnsw"))
        self.kind = "hnsw"

    # ---- updates -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._transaction("count the rows of") as conn:
            return int(conn.execute(select(func.count()).select_from(self.table)).scalar_one())

    def __contains__(self, listing_id: object) -> bool:
        if not isinstance(listing_id, str):
            return False
        with self._transaction("look up a listing in") as conn:
            return bool(conn.execute(select(exists().where(self.table.c.product_id == listing_id))).scalar_one())

    def listing_ids(self) -> list[str]:
        with self._transaction("list the listings of") as conn:
            return list(conn.execute(select(self.table.c.product_id).order_by(self.table.c.product_id)).scalars())

    def _write(self, ids: list[str], vectors: np.ndarray, *, replace: bool) -> None:
        staging = Table(f"staging_{self.name}", MetaData(), Column("product_id", Text),
                        Column("embedding", VECTOR(self.embedding.dim)),
                        prefixes=["TEMPORARY"], postgresql_on_commit="DROP")
        with self._transaction("write to") as conn:
            staging.create(conn)
            _copy_rows(conn, staging.name, ids, vectors)
            unknown = conn.execute(select(staging.c.product_id).where(
                ~exists().where(products.c.id == staging.c.product_id))).scalars().all()
            if unknown:
                raise UnknownListingError(unknown, f"the {products.name} table of database {mask_url(self.engine.url)}")
            rows = select(staging.c.product_id, staging.c.embedding)
            if replace:
                statement = pg_insert(self.table).from_select(["product_id", "embedding"], rows)
                conn.execute(statement.on_conflict_do_update(index_elements=[self.table.c.product_id],
                                                             set_={"embedding": statement.excluded.embedding}))
            else:
                present = conn.execute(select(staging.c.product_id).where(
                    exists().where(self.table.c.product_id == staging.c.product_id))).scalars().all()
                if present:
                    raise DuplicateListingError(present, "are in the index already (upsert replaces their vectors)")
                conn.execute(insert(self.table).from_select(["product_id", "embedding"], rows))
            if len(ids) >= _ANALYZE_AFTER_ROWS:
                conn.execute(text(f'ANALYZE "{self.table.name}"'))

    def _delete(self, ids: list[str]) -> None:
        with self._transaction("delete from") as conn:
            present = set(conn.execute(select(self.table.c.product_id).where(
                self.table.c.product_id == any_(_text_array("ids", ids)))).scalars())
            unknown = [listing_id for listing_id in ids if listing_id not in present]
            if unknown:
                raise UnknownListingError(unknown, self._where)
            conn.execute(delete(self.table).where(self.table.c.product_id == any_(_text_array("ids", ids))))

    # ---- reading -------------------------------------------------------------------------------------------
    def _get_vectors(self, ids: list[str]) -> np.ndarray:
        with self._transaction("read vectors from") as conn:
            rows = conn.execute(select(self.table.c.product_id, self.table.c.embedding).where(
                self.table.c.product_id == any_(_text_array("ids", ids)))).all()
        found = {listing_id: vector for listing_id, vector in rows}
        unknown = [listing_id for listing_id in ids if listing_id not in found]
        if unknown:
            raise UnknownListingError(unknown, self._where)
        return np.asarray([found[listing_id] for listing_id in ids], dtype=np.float32).reshape(
            len(ids), self.embedding.dim)

    def _search(self, queries: np.ndarray, k: int, exclusions: list[frozenset[str]],
                filters: SearchFilters | None) -> list[list[Neighbour]]:
        results = []
        with self._transaction("search") as conn:
            for query, excluded in zip(queries, exclusions):
                statement = self._query(query, k, excluded, filters)
                if self.kind == "hnsw":
                    ef_search = min(max(self.ef_search, k + len(excluded)), MAX_EF_SEARCH)
                    conn.execute(text(f"SET LOCAL hnsw.ef_search = {ef_search}"))
                rows = conn.execute(statement).all()
                if self.kind == "hnsw" and len(rows) < k:
                    # Filters or exclusions may have eaten the HNSW candidates: ask again, exactly.
                    conn.execute(text("SET LOCAL enable_indexscan = off"))
                    rows = conn.execute(statement).all()
                    conn.execute(text("SET LOCAL enable_indexscan = on"))
                results.append([Neighbour(listing_id, -float(distance)) for listing_id, distance in rows])
        return results

    def _query(self, query: np.ndarray, k: int, excluded: frozenset[str],
               filters: SearchFilters | None) -> Select[Any]:
        """The SQL of one query: nearest by inner product (``<#>`` is its negation), filtered."""
        distance = self.table.c.embedding.max_inner_product(query)
        statement = select(self.table.c.product_id, distance).order_by(distance).limit(k)
        if excluded:
            statement = statement.where(self.table.c.product_id.not_in(sorted(excluded)))
        if filters is None:
            return statement
        if filters.allowed_ids is not None:
            statement = statement.where(
                self.table.c.product_id == any_(_text_array("allowed", sorted(filters.allowed_ids))))
        if filters.database_filters:
            statement = statement.join(products, products.c.id == self.table.c.product_id)
        if filters.category is not None:
            statement = statement.where(or_(products.c.category == filters.category,
                                            products.c.category.startswith(f"{filters.category} /", autoescape=True)))
        if filters.min_price is not None:
            statement = statement.where(products.c.price >= filters.min_price)
        if filters.max_price is not None:
            statement = statement.where(products.c.price <= filters.max_price)
        if filters.location is not None:
            statement = statement.where(
                func.lower(products.c.location).contains(filters.location.lower(), autoescape=True))
        return statement

    # ---- plumbing ------------------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self, action: str) -> Iterator[Connection]:
        """``engine.begin()``, with database failures raised as ``SearchError`` naming the index and the action."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise SearchError(f"cannot {action} {self._where}: {describe_db_error(exc)}") from exc


def _text_array(name: str, values: Sequence[str]) -> Any:
    """A bound ``text[]`` parameter: one parameter for any number of ids (``= ANY(:name)``)."""
    return bindparam(name, list(values), type_=ARRAY(Text))


def _copy_rows(conn: Connection, table_name: str, ids: list[str], vectors: np.ndarray) -> None:
    """Stream ``(id, vector)`` rows into ``table_name`` with PostgreSQL's binary COPY (pgvector's binary format:
    int16 dimension, int16 zero, big-endian float32 values), ``_COPY_ROWS`` rows per COPY."""
    dim = vectors.shape[1]
    vector_header = struct.pack("!ihh", 4 + 4 * dim, dim, 0)
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        for start in range(0, len(ids), _COPY_ROWS):
            chunk = vectors[start:start + _COPY_ROWS].astype(">f4")
            buffer = io.BytesIO()
            buffer.write(_COPY_HEADER)
            for listing_id, vector in zip(ids[start:start + _COPY_ROWS], chunk):
                raw_id = listing_id.encode("utf-8")
                buffer.write(struct.pack("!hi", 2, len(raw_id)) + raw_id + vector_header + vector.tobytes())
            buffer.write(_COPY_TRAILER)
            buffer.seek(0)
            cursor.copy_expert(f'COPY "{table_name}" (product_id, embedding) FROM STDIN WITH (FORMAT binary)', buffer)
    finally:
        cursor.close()


def _check_engine(engine: Engine) -> None:
    if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg2":
        raise IndexConfigError(f"the pgvector backend needs PostgreSQL through psycopg2; database "
                               f"{mask_url(engine.url)} is {engine.dialect.name}+{engine.dialect.driver}")


def _check_hnsw_dim(dim: int) -> None:
    if dim > MAX_HNSW_DIM:
        raise IndexConfigError(f"pgvector's HNSW index takes at most {MAX_HNSW_DIM} dimensions, the vectors have {dim}")


def _check_settings(name: str, embedding: EmbeddingSpec, kind: str, hnsw_m: int, ef_construction: int,
                    ef_search: int) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise IndexConfigError(f"index name must be a lower-case SQL identifier of at most 58 characters "
                               f"(letters, digits, '_'), got {name!r}")
    if kind not in KINDS:
        raise IndexConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "hnsw":
        _check_hnsw_dim(embedding.dim)
    for setting, value, low, high in (("hnsw_m", hnsw_m, 2, 100), ("ef_construction", ef_construction, 4, 1000),
                                      ("ef_search", ef_search, 1, MAX_EF_SEARCH)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise IndexConfigError(f"{setting} must be an integer from {low} to {high} (pgvector's range), "
                                   f"got {value!r}")
    if ef_construction < 2 * hnsw_m:
        raise IndexConfigError(f"ef_construction ({ef_construction}) must be at least twice hnsw_m ({hnsw_m})")
