"""Load the users' CSV export (``products.csv``, ``images.csv``) into any database URL.

The export is read as it is:
- records end at ``\\n`` only; a bare ``\\r`` is data (the export has them inside unquoted fields)
  and is stored as it is, cleaning happens later in ``text.clean_listing_text``;
- the unnamed first column (the old DataFrame index) is ignored;
- prices like ``£1,250.00`` become numeric pounds in ``price``, ``N/A`` and unparsable prices become
  NULL, and ``price_text`` keeps the exported text either way;
- dates are dd/mm/yyyy.

Importing is idempotent: rows are matched on ``id`` and inserted, updated or left unchanged, both tables
in one transaction, with portable SQL (no dialect-specific upsert) so SQLite and PostgreSQL behave alike.
Rows already in the database but absent from the files are left alone. Every rejected row is kept in
the report with its line number and reason.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Table, bindparam, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from .._progress import progress_bar
from .database import describe_db_error, mask_url, open_engine
from .errors import DatabaseError, ImportFileError
from .schema import create_schema, images, products
from .text import decode_bytes

PRODUCT_COLUMNS = ("id", "product_name", "category", "product_description", "price", "location")
PRODUCT_OPTIONAL_COLUMNS = ("page_id", "create_time")
IMAGE_COLUMNS = ("id", "product_id", "bucket_link", "image_ref", "create_time")

# Stands in for bare carriage returns while the csv module splits records, which it would do at '\r'.
_CR_STANDIN = "\ue000"
_PRICE = re.compile(r"£?\s*(\d[\d,]*(?:\.\d{1,2})?)")
_NO_PRICE = {"", "n/a", "na", "-"}
_BATCH = 1000
# How many rejected rows __str__ lists per table; the report object keeps them all.
_SHOWN_REJECTS = 20


@dataclass(frozen=True)
class RejectedRow:
    """One row that was not imported: its line in the file, its id when it has one, and why."""

    line: int
    row_id: str
    reason: str


@dataclass
class TableReport:
    """What happened to one file's rows. ``rows_read == inserted + updated + unchanged + len(rejected)``."""

    table: str
    source: str
    rows_read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)
    rows_in_database: int = 0


@dataclass
class ImportReport:
    """Counts per table, every rejected row with its reason, and notes (e.g. unparsable prices kept as NULL)."""

    database: str
    products: TableReport
    images: TableReport
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        header = ("table", "rows read", "inserted", "updated", "unchanged", "rejected", "now in database")
        rows = [header] + [
            (t.table, *(f"{n:,}" for n in (t.rows_read, t.inserted, t.updated, t.unchanged, len(t.rejected),
                                           t.rows_in_database)))
            for t in (self.products, self.images)
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"Import into {self.database}"]
        lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                  for row in rows]
        for table in (self.products, self.images):
            if not table.rejected:
                continue
            lines.append(f"Rejected from {table.source}:")
            for row in table.rejected[:_SHOWN_REJECTS]:
                lines.append(f"  line {row.line} (id {row.row_id or '-'}): {row.reason}")
            if len(table.rejected) > _SHOWN_REJECTS:
                lines.append(f"  ... and {len(table.rejected) - _SHOWN_REJECTS:,} more; by reason:")
                for reason, count in Counter(_reason_kind(r.reason) for r in table.rejected).most_common():
                    lines.append(f"    {count:,} x {reason}")
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)

    def write_rejected_csv(self, path: str | Path) -> None:
        """Every rejected row of both files as CSV (file, line, id, reason)."""
        with Path(path).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("file", "line", "id", "reason"))
            for table in (self.products, self.images):
                writer.writerows((table.source, r.line, r.row_id, r.reason) for r in table.rejected)


def _reason_kind(reason: str) -> str:
    """The reason without its row-specific values (quoted ids and dates, line numbers), to count by kind."""
    return re.sub(r"line \d+", "line N", re.sub(r"'[^']*'", "'...'", reason))


@dataclass
class _Records:
    """A CSV file split into records: header names and (first line number, fields) per record."""

    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]
    notes: list[str]


def _read_records(path: Path) -> _Records:
    """Split ``path`` into records at ``\\n`` only, keeping bare ``\\r`` inside fields."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImportFileError(f"cannot read CSV file {path}: {exc.strerror or exc}") from exc
    notes: list[str] = []
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Keep the rows: a few bad bytes in a description should not cost the listing.
        text = decode_bytes(raw)
        notes.append(f"{path.name}: not valid UTF-8 (first bad byte at offset {exc.start}); "
                     "invalid bytes were read as Windows-1252")
    if "\x00" in text:
        notes.append(f"{path.name}: {text.count(chr(0)):,} NUL characters removed (databases cannot store them)")
        text = text.replace("\x00", "")
    if _CR_STANDIN in text:
        raise ImportFileError(f"{path}: contains the private-use character U+E000 the importer relies on")
    text = text.replace("\r\n", "\n").replace("\r", _CR_STANDIN)
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    next_line = 1
    for fields in reader:
        first_line, next_line = next_line, reader.line_num + 1
        fields = [value.replace(_CR_STANDIN, "\r") for value in fields]
        if header is None:
            header = [name.strip() for name in fields]
        elif any(value.strip() for value in fields):  # blank lines carry no data
            records.append((first_line, fields))
    if header is None:
        raise ImportFileError(f"CSV file {path} is empty")
    return _Records(path, header, records, notes)


def _column_positions(records: _Records, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, int]:
    """Index of each known column in the header; a missing required column is an error naming the file."""
    positions = {name: i for i, name in enumerate(records.header) if name}
    missing = [name for name in required if name not in positions]
    if missing:
        raise ImportFileError(f"{records.path}: missing column(s) {', '.join(missing)}; "
                              f"found {', '.join(repr(h) for h in records.header)}")
    ignored = sorted(set(positions) - set(required) - set(optional))
    if ignored:
        records.notes.append(f"{records.path.name}: ignored unknown column(s) {', '.join(ignored)}")
    return {name: positions[name] for name in (*required, *optional) if name in positions}


def _blank_to_none(value: str | None) -> str | None:
    return value if value is not None and value.strip() else None


def parse_price(text: str) -> Decimal | None:
    """``£1,250.00`` -> ``Decimal('1250.00')``; None for ``N/A``, empty or anything else unparsable."""
    match = _PRICE.fullmatch(text.strip())
    return Decimal(match.group(1).replace(",", "")) if match else None


def parse_date(text: str) -> date | None:
    """dd/mm/yyyy -> date; None for an empty string; ValueError for anything else."""
    text = text.strip()
    return datetime.strptime(text, "%d/%m/%Y").date() if text else None


class _RowChecker:
    """Rejects rows with a wrong field count, an empty or duplicated id; remembers where ids were seen."""

    def __init__(self, records: _Records, columns: dict[str, int], report: TableReport) -> None:
        self.records = records
        self.columns = columns
        self.report = report
        self.first_seen: dict[str, int] = {}

    def rows(self) -> Iterator[tuple[int, dict[str, str]]]:
        n_fields = len(self.records.header)
        for line, fields in self.records.rows:
            self.report.rows_read += 1
            row_id = fields[self.columns["id"]].strip() if len(fields) > self.columns["id"] else ""
            if len(fields) != n_fields:
                self.reject(line, row_id, f"expected {n_fields} fields, found {len(fields)}")
            elif not row_id:
                self.reject(line, row_id, "empty id")
            elif row_id in self.first_seen:
                self.reject(line, row_id, f"duplicate id, first seen on line {self.first_seen[row_id]}")
            else:
                self.first_seen[row_id] = line
                values = {name: fields[i] for name, i in self.columns.items()}
                values["id"] = row_id
                yield line, values

    def reject(self, line: int, row_id: str, reason: str) -> None:
        self.report.rejected.append(RejectedRow(line, row_id, reason))


def _product_rows(records: _Records, columns: dict[str, int], report: TableReport,
                  notes: list[str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Database rows from products.csv, and the line of every rejected id (to explain its images' rejection)."""
    checker = _RowChecker(records, columns, report)
    rows: list[dict[str, Any]] = []
    unparsable_prices: list[int] = []
    for line, values in checker.rows():
        try:
            created = parse_date(values.get("create_time", ""))
        except ValueError:
            checker.reject(line, values["id"], f"create_time {values['create_time']!r} is not a dd/mm/yyyy date")
            continue
        price = parse_price(values["price"])
        if price is None and values["price"].strip().lower() not in _NO_PRICE:
            unparsable_prices.append(line)
        rows.append({
            "id": values["id"],
            "product_name": values["product_name"],
            "category": _blank_to_none(values["category"]),
            "product_description": values["product_description"],
            "price": price,
            "price_text": _blank_to_none(values["price"]),
            "location": _blank_to_none(values["location"]),
            "page_id": _blank_to_none(values.get("page_id")),
            "create_time": created,
        })
    if unparsable_prices:
        notes.append(f"{records.path.name}: {len(unparsable_prices):,} unparsable price(s) stored as NULL with the "
                     f"text kept in price_text (lines {', '.join(map(str, unparsable_prices[:10]))}"
                     f"{', ...' if len(unparsable_prices) > 10 else ''})")
    accepted = {row["id"] for row in rows}
    rejected_lines = {r.row_id: r.line for r in report.rejected if r.row_id and r.row_id not in accepted}
    return rows, rejected_lines


def _image_rows(conn: Connection, records: _Records, columns: dict[str, int], report: TableReport,
                csv_products: set[str], rejected_products: dict[str, int], products_file: str) -> list[dict[str, Any]]:
    """Database rows from images.csv; images whose product is neither imported nor in the database are rejected."""
    checker = _RowChecker(records, columns, report)
    candidates = [(line, values, values["product_id"].strip()) for line, values in checker.rows()]
    known = csv_products | _existing_ids(
        conn, products, sorted({pid for _, _, pid in candidates if pid and pid not in csv_products}))
    rows: list[dict[str, Any]] = []
    for line, values, product_id in candidates:
        if not product_id:
            checker.reject(line, values["id"], "empty product_id")
            continue
        if product_id not in known:
            if product_id in rejected_products:
                line_of_product = rejected_products[product_id]
                reason = f"its product {product_id!r} was rejected ({products_file} line {line_of_product})"
            else:
                reason = f"product_id {product_id!r} is neither in {products_file} nor in the database"
            checker.reject(line, values["id"], reason)
            continue
        try:
            created = parse_date(values["create_time"])
        except ValueError:
            checker.reject(line, values["id"], f"create_time {values['create_time']!r} is not a dd/mm/yyyy date")
            continue
        rows.append({
            "id": values["id"],
            "product_id": product_id,
            "bucket_link": _blank_to_none(values["bucket_link"]),
            "image_ref": _blank_to_none(values["image_ref"]),
            "create_time": created,
        })
    return rows


def _batches(items: Sequence[Any], size: int = _BATCH) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _existing_ids(conn: Connection, table: Table, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are already in ``table``."""
    found: set[str] = set()
    for batch in _batches(ids):
        found.update(conn.execute(select(table.c.id).where(table.c.id.in_(batch))).scalars())
    return found


def _upsert(conn: Connection, table: Table, rows: list[dict[str, Any]], report: TableReport, progress: bool) -> None:
    """Insert new ids, update changed rows, count unchanged ones; all inside the caller's transaction."""
    columns = [c.name for c in table.columns if c.name != "id"]
    update_stmt = (update(table).where(table.c.id == bindparam("match_id"))
                   .values({name: bindparam(f"new_{name}") for name in columns}))
    with progress_bar(total=len(rows), desc=f"import {table.name}", unit="row", disable=not progress) as bar:
        for batch in _batches(rows):
            stored = {row.id: row._mapping for row in
                      conn.execute(select(table).where(table.c.id.in_([r["id"] for r in batch])))}
            new = [row for row in batch if row["id"] not in stored]
            changed = [row for row in batch
                       if row["id"] in stored and any(stored[row["id"]][name] != row[name] for name in columns)]
            if new:
                conn.execute(insert(table), new)
            if changed:
                conn.execute(update_stmt, [{"match_id": row["id"], **{f"new_{n}": row[n] for n in columns}}
                                           for row in changed])
            report.inserted += len(new)
            report.updated += len(changed)
            report.unchanged += len(batch) - len(new) - len(changed)
            bar.update(len(batch))


def import_csv(products_csv: str | Path, images_csv: str | Path, db_url: str | None = None, *,
               progress: bool = True) -> ImportReport:
    """Import the two CSV files into ``db_url`` (None: ``settings.default_db_url()``); see the module docstring.

    Raises ``ImportFileError`` for an unreadable file or missing columns (nothing is written then) and
    ``DatabaseError`` when the database fails (the transaction is rolled back).
    """
    product_records = _read_records(Path(products_csv))
    image_records = _read_records(Path(images_csv))
    # Both headers are checked before the database is touched.
    product_columns = _column_positions(product_records, PRODUCT_COLUMNS, PRODUCT_OPTIONAL_COLUMNS)
    image_columns = _column_positions(image_records, IMAGE_COLUMNS)
    engine = open_engine(db_url, create=True)
    shown = mask_url(engine.url)
    report = ImportReport(
        database=shown,
        products=TableReport("products", str(product_records.path)),
        images=TableReport("images", str(image_records.path)),
        notes=product_records.notes + image_records.notes,
    )
    product_rows, rejected_products = _product_rows(product_records, product_columns, report.products, report.notes)
    table = "products"
    try:
        create_schema(engine)
        with engine.begin() as conn:
            _upsert(conn, products, product_rows, report.products, progress)
            image_rows = _image_rows(conn, image_records, image_columns, report.images,
                                     {row["id"] for row in product_rows}, rejected_products, product_records.path.name)
            table = "images"
            _upsert(conn, images, image_rows, report.images, progress)
            for table_report, table_obj in ((report.products, products), (report.images, images)):
                table_report.rows_in_database = conn.execute(select(func.count()).select_from(table_obj)).scalar_one()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"import into {shown} failed while writing table {table!r} "
                            f"(nothing was written): {describe_db_error(exc)}") from exc
    finally:
        engine.dispose()
    return report
