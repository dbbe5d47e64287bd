"""Open any database URL and read the two tables, with errors that name the URL and the table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sqlalchemy import URL, Engine, Table, create_engine, event, inspect, make_url, select
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from ..settings import default_db_url
from .errors import DatabaseError
from .schema import images, products

# Fail fast on an unreachable server instead of waiting for the OS TCP timeout.
_PG_CONNECT_TIMEOUT_S = 5


def mask_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ``***``, for messages and reports."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


def describe_db_error(exc: BaseException) -> str:
    """First line of the driver's message: enough to say why, without the SQL and the traceback."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def _sqlite_file(url: URL) -> Path | None:
    """The file of a file-backed SQLite URL; None for in-memory SQLite and for other databases."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _enable_sqlite_foreign_keys(dbapi_connection: object, _record: object) -> None:
    """SQLite ignores FOREIGN KEY clauses unless asked per connection."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_engine(url: str | None = None, *, create: bool = False) -> Engine:
    """An engine for ``url`` (None: ``settings.default_db_url()``), checked by connecting once.

    ``create=True`` allows a SQLite file (and its folder) that does not exist yet to be created, as
    importing does; when reading, a missing SQLite file is an error rather than a new empty database.
    """
    url = url or default_db_url()
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseError(f"invalid database URL {url!r}: {exc}") from exc
    shown = mask_url(parsed)
    sqlite_file = _sqlite_file(parsed)
    if sqlite_file is not None:
        if create:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        elif not sqlite_file.exists():
            raise DatabaseError(
                f"database {shown}: file {sqlite_file} does not exist; create it with "
                "scripts/import_csv.py or scripts/make_sample_data.py"
            )
    connect_args = {"connect_timeout": _PG_CONNECT_TIMEOUT_S} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = create_engine(parsed, connect_args=connect_args)
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise DatabaseError(f"database {shown}: no usable driver ({exc})") from exc
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _enable_sqlite_foreign_keys)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        engine.dispose()
        raise DatabaseError(f"cannot connect to database {shown}: {describe_db_error(exc)}") from exc
    return engine


def _read_table(engine: Engine, table: Table) -> pd.DataFrame:
    """All rows of ``table`` as a DataFrame with the schema's columns, in primary-key order."""
    shown = mask_url(engine.url)
    try:
        if not inspect(engine).has_table(table.name):
            raise DatabaseError(
                f"table {table.name!r} not found in database {shown}; "
                "load data with scripts/import_csv.py or scripts/make_sample_data.py"
            )
        with engine.connect() as conn:
            result = conn.execute(select(table).order_by(table.c.id))
            frame = pd.DataFrame(result.all(), columns=list(result.keys()))
    except SQLAlchemyError as exc:
        reason = describe_db_error(exc)
        raise DatabaseError(f"cannot read table {table.name!r} from database {shown}: {reason}") from exc
    frame["create_time"] = pd.to_datetime(frame["create_time"])
    return frame


def read_products(engine: Engine) -> pd.DataFrame:
    """The ``products`` table; ``price`` as float pounds (NaN where unknown), ``create_time`` as datetime."""
    frame = _read_table(engine, products)
    frame["price"] = pd.to_numeric(frame["price"].astype(object), errors="coerce").astype("float64")
    return frame


def read_images(engine: Engine) -> pd.DataFrame:
    """The ``images`` table; ``create_time`` as datetime."""
    return _read_table(engine, images)
