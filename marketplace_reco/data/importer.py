"""Load the users' CSV export (``products.csv``, ``images.csv``) into any database URL.

The export is read as it is:
- records end at ``\\n`` only; a bare ``\\r`` is data (the export has them inside unquoted fields)
  and is stored as it is, cleaning happens later in ``text.clean_listing_text``. Line numbers count
  ``\\n``-terminated physical lines, the header being line 1;
- the unnamed first column (the old DataFrame index) holds a whole number and is otherwise ignored;
- prices like ``£1,250.00`` become numeric pounds in ``price``, ``N/A`` and unparsable prices become
  NULL, and ``price_text`` keeps the exported text;
- an empty or blank category is stored as NULL and the product is counted as unlabelled;
- dates are dd/mm/yyyy.

No record is lost silently. A record starts on a line that begins with its index (a whole number) and
its id (letters, digits, ``.``, ``_``, ``-``). A quoted field may run onto the following lines, but
never into a line that starts a record and never past ``max_record_lines`` lines: a record whose
quote is still open there is rejected with its lines, and reading resumes with the next line, so an
unbalanced quote costs only its own record. Lines that are part of no record are rejected as well, and
so are records with the wrong number of fields, malformed quoting, a duplicated id or a bad date.
The report accounts for every line (header + blank + lines of records) and every record (imported +
rejected).

Importing is idempotent: rows are matched on ``id`` and inserted, updated or left unchanged, both tables
in one transaction, with portable SQL (no dialect-specific upsert) so SQLite and PostgreSQL behave alike.
Rows already in the database but absent from the files are left alone.
"""

from __future__ import annotations

import codecs
import csv
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
from .errors import DatabaseError, DataConfigError, ImportFileError
from .schema import ID_PATTERN, create_schema, images, products
from .text import decode_bytes

PRODUCT_COLUMNS = ("id", "product_name", "category", "product_description", "price", "location")
PRODUCT_OPTIONAL_COLUMNS = ("page_id", "create_time")
IMAGE_COLUMNS = ("id", "product_id", "bucket_link", "image_ref", "create_time")

#: Most physical lines one record may span. Every record of the real export is a single line, yet its
#: longest description holds 519 line breaks (as bare ``\\r``, which do not end a line); an export that
#: wrote them as ``\\n`` would span 520 lines. A quote still open after that many lines is unbalanced.
MAX_RECORD_LINES = 520

# Stands in for bare carriage returns while the csv module splits fields, which it would end at '\r'.
_CR_STANDIN = "\ue000"
# A field before the id on a record's first line, quoted (on that line) or not.
_ANY_FIELD = r'(?:"(?:[^"]|"")*"|[^,"]*)'
_PRICE = re.compile(r"£?\s*(\d[\d,]*(?:\.\d{1,2})?)")
_NO_PRICE = {"", "n/a", "na", "-"}
_BATCH = 1000
# How many rejected rows (and line numbers in notes) __str__ lists; the report object keeps them all.
_SHOWN_REJECTS = 20
_SHOWN_LINES = 10


def _where(first_line: int, last_line: int) -> str:
    """``line 7`` or ``lines 7-9``."""
    return f"line {first_line}" if first_line == last_line else f"lines {first_line}-{last_line}"


@dataclass(frozen=True)
class RejectedRow:
    """One record that was not imported: its physical lines in the file, its id when it has one, and why."""

    first_line: int
    last_line: int
    row_id: str
    reason: str

    @property
    def where(self) -> str:
        return _where(self.first_line, self.last_line)


@dataclass
class TableReport:
    """What happened to one file's lines and records; ``check()`` verifies that they add up.

    ``physical_lines == 1 (header) + blank_lines + record_lines`` and
    ``records_read == inserted + updated + unchanged + len(rejected)``; ``unlabelled`` (products only)
    counts imported products whose category is empty or blank.
    """

    table: str
    source: str
    physical_lines: int = 0
    blank_lines: int = 0
    record_lines: int = 0
    records_read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)
    unlabelled: int | None = None
    rows_in_database: int = 0

    @property
    def imported(self) -> int:
        return self.inserted + self.updated + self.unchanged

    def reconciliation(self) -> str:
        """The two sums as one sentence, e.g. for a summary."""
        return (f"{Path(self.source).name}: {self.physical_lines:,} lines = 1 header + {self.blank_lines:,} blank + "
                f"{self.record_lines:,} in records; {self.records_read:,} records = {self.imported:,} imported + "
                f"{len(self.rejected):,} rejected")

    def check(self) -> None:
        """Raise AssertionError when the lines or the records do not add up: a record would be lost unseen."""
        if (self.physical_lines != 1 + self.blank_lines + self.record_lines
                or self.records_read != self.imported + len(self.rejected)):
            raise AssertionError(f"import report does not add up: {self.reconciliation()}")


@dataclass
class ImportReport:
    """Counts per table, every rejected record with its lines and reason, and notes (e.g. unparsable prices)."""

    database: str
    products: TableReport
    images: TableReport
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        tables = (self.products, self.images)
        for table in tables:
            table.check()
        header = ("table", "lines", "records read", "inserted", "updated", "unchanged", "rejected", "unlabelled",
                  "now in database")
        rows = [header] + [
            (t.table, *(f"{n:,}" for n in (t.physical_lines, t.records_read, t.inserted, t.updated, t.unchanged,
                                           len(t.rejected))),
             "-" if t.unlabelled is None else f"{t.unlabelled:,}", f"{t.rows_in_database:,}")
            for t in tables
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"Import into {self.database}"]
        lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                  for row in rows]
        lines += [table.reconciliation() for table in tables]
        for table in tables:
            if not table.rejected:
                continue
            lines.append(f"Rejected from {table.source}:")
            for row in table.rejected[:_SHOWN_REJECTS]:
                lines.append(f"  {row.where} (id {row.row_id or '-'}): {row.reason}")
            if len(table.rejected) > _SHOWN_REJECTS:
                lines.append(f"  ... and {len(table.rejected) - _SHOWN_REJECTS:,} more; by reason:")
                for reason, count in Counter(_reason_kind(r.reason) for r in table.rejected).most_common():
                    lines.append(f"    {count:,} x {reason}")
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)

    def write_rejected_csv(self, path: str | Path) -> None:
        """Every rejected record of both files as CSV (file, first_line, last_line, id, reason)."""
        with Path(path).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("file", "first_line", "last_line", "id", "reason"))
            for table in (self.products, self.images):
                writer.writerows((table.source, r.first_line, r.last_line, r.row_id, r.reason)
                                 for r in table.rejected)


def _reason_kind(reason: str) -> str:
    """The reason without its row-specific values (quoted ids and dates, line numbers), to count by kind."""
    return re.sub(r"lines? \d+(?:-\d+)?", "line N", re.sub(r"'[^']*'", "'...'", reason))


def _line_list(line_numbers: Sequence[int]) -> str:
    """``lines 3, 8, ...`` with at most ``_SHOWN_LINES`` numbers."""
    shown = ", ".join(map(str, line_numbers[:_SHOWN_LINES]))
    return f"line{'s' if len(line_numbers) > 1 else ''} {shown}{', ...' if len(line_numbers) > _SHOWN_LINES else ''}"


@dataclass(frozen=True)
class _Record:
    """The physical lines of one record (1-based, inclusive), its id, and its fields or why it has none."""

    first_line: int
    last_line: int
    row_id: str
    fields: list[str]
    problem: str | None = None


@dataclass
class _Records:
    """A CSV file split into records, with what is needed to account for every line."""

    path: Path
    header: list[str]
    columns: dict[str, int]
    records: list[_Record]
    physical_lines: int
    blank_lines: int
    notes: list[str]


def _read_text(path: Path, notes: list[str]) -> str:
    """The file as text with ``\\n`` line ends; invalid UTF-8 and NUL characters are noted, never fatal."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImportFileError(f"cannot read CSV file {path}: {exc.strerror or exc}") from exc
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
    return text.replace("\r\n", "\n")


def _column_positions(path: Path, header: list[str], required: Sequence[str], optional: Sequence[str],
                      notes: list[str]) -> dict[str, int]:
    """Index of each known column in the header; a missing required column is an error naming the file."""
    positions = {name: i for i, name in enumerate(header) if name}
    missing = [name for name in required if name not in positions]
    if missing:
        raise ImportFileError(f"{path}: missing column(s) {', '.join(missing)}; "
                              f"found {', '.join(repr(h) for h in header)}")
    ignored = sorted(set(positions) - set(required) - set(optional))
    if ignored:
        notes.append(f"{path.name}: ignored unknown column(s) {', '.join(ignored)}")
    return {name: positions[name] for name in (*required, *optional) if name in positions}


def _record_start(header: list[str], id_position: int) -> re.Pattern[str]:
    """What the first line of a record looks like: the fields up to the id, each of its expected shape.

    An unnamed column (the index) holds a whole number, the id is one of ``schema.ID_PATTERN``; either may be quoted.
    """
    before_id = [r'(?:"\d+"|\d+)' if not name else _ANY_FIELD for name in header[:id_position]]
    return re.compile(",".join([*before_id, rf'(?P<quote>"?)(?P<id>{ID_PATTERN})(?P=quote)']) + "(?:,|$)")


def _parse_record(lines: list[str], first: int, starts_record: re.Pattern[str],
                  max_record_lines: int) -> tuple[list[str], int, str | None]:
    """Fields of the record whose first line is ``lines[first]`` (0-based), the index past its last line, and
    why it could not be parsed (no fields then; None when it could).

    A quoted field may continue onto the next line unless that line starts a record or the record would span
    more than ``max_record_lines`` lines.
    """
    line = lines[first]
    if '"' not in line:  # nothing can continue a field, and csv would split the line just so
        return line.split(","), first + 1, None
    still_open: str | None = None

    def physical_lines() -> Iterator[str]:
        nonlocal still_open
        # The csv reader asks for a next line only while a quoted field is still open.
        for k in range(first, len(lines)):
            if k > first and starts_record.match(lines[k]):
                still_open = (f"unbalanced quote: a quoted field is still open at the end of line {k}, "
                              f"and line {k + 1} starts a new record")
                return
            if k - first == max_record_lines:
                still_open = (f"unbalanced quote: a quoted field is still open after {max_record_lines} lines, "
                              "the most a record may span")
                return
            yield lines[k].replace("\r", _CR_STANDIN) + "\n"
        still_open = "unbalanced quote: a quoted field is still open at the end of the file"

    reader = csv.reader(physical_lines(), strict=True)
    try:
        fields = next(reader)
    except csv.Error as exc:
        end = first + reader.line_num  # past the last line read, and that line's 1-based number
        return [], end, still_open or f"malformed CSV on line {end}: {exc}"
    return [value.replace(_CR_STANDIN, "\r") for value in fields], first + reader.line_num, None


def _read_records(path: Path, required: Sequence[str], optional: Sequence[str] = (), *,
                  max_record_lines: int) -> _Records:
    """Split ``path`` into records (see the module docstring), every physical line accounted for."""
    notes: list[str] = []
    lines = _read_text(path, notes).split("\n")
    if lines[-1] == "":  # the line break that ends the last line opens no new line
        lines.pop()
    if not lines:
        raise ImportFileError(f"CSV file {path} is empty")
    try:
        header = [name.strip() for name in next(csv.reader([lines[0]], strict=True))]
    except csv.Error as exc:
        raise ImportFileError(f"{path}: cannot read the header (line 1): {exc}") from exc
    columns = _column_positions(path, header, required, optional, notes)
    starts_record = _record_start(header, columns["id"])
    records: list[_Record] = []
    blank_lines = 0
    k = 1
    while k < len(lines):
        if not lines[k].strip():
            blank_lines += 1
            k += 1
            continue
        start = starts_record.match(lines[k])
        if start is None:
            end = k + 1
            while end < len(lines) and lines[end].strip() and not starts_record.match(lines[end]):
                end += 1
            records.append(_Record(k + 1, end, "", [], "not part of any record: a record's first line starts "
                                                         "with its index (a whole number) and its id"))
        else:
            fields, end, problem = _parse_record(lines, k, starts_record, max_record_lines)
            records.append(_Record(k + 1, end, start["id"], fields, problem))
        k = end
    return _Records(path, header, columns, records, len(lines), blank_lines, notes)


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
    """Counts every record of a file and rejects the unparsed, those with a wrong field count or a duplicated id."""

    def __init__(self, records: _Records, report: TableReport) -> None:
        self.records = records
        self.report = report
        self.first_seen: dict[str, int] = {}
        report.physical_lines = records.physical_lines
        report.blank_lines = records.blank_lines

    def rows(self) -> Iterator[tuple[_Record, dict[str, str]]]:
        n_fields = len(self.records.header)
        for record in self.records.records:
            self.report.records_read += 1
            self.report.record_lines += record.last_line - record.first_line + 1
            if record.problem is not None:
                self.reject(record, record.problem)
            elif len(record.fields) != n_fields:
                self.reject(record, f"expected {n_fields} fields, found {len(record.fields)}")
            elif record.row_id in self.first_seen:
                self.reject(record, f"duplicate id, first seen on line {self.first_seen[record.row_id]}")
            else:
                self.first_seen[record.row_id] = record.first_line
                yield record, {name: record.fields[i] for name, i in self.records.columns.items()}

    def reject(self, record: _Record, reason: str) -> None:
        self.report.rejected.append(RejectedRow(record.first_line, record.last_line, record.row_id, reason))


def _product_rows(records: _Records, report: TableReport,
                  notes: list[str]) -> tuple[list[dict[str, Any]], dict[str, RejectedRow]]:
    """Database rows from products.csv, and every rejected product by id (to explain its images' rejection)."""
    checker = _RowChecker(records, report)
    rows: list[dict[str, Any]] = []
    unparsable_prices: list[int] = []
    unlabelled: list[int] = []
    for record, values in checker.rows():
        try:
            created = parse_date(values.get("create_time", ""))
        except ValueError:
            checker.reject(record, f"create_time {values['create_time']!r} is not a dd/mm/yyyy date")
            continue
        price = parse_price(values["price"])
        if price is None and values["price"].strip().lower() not in _NO_PRICE:
            unparsable_prices.append(record.first_line)
        category = _blank_to_none(values["category"])
        if category is None:
            unlabelled.append(record.first_line)
        rows.append({
            "id": record.row_id,
            "product_name": values["product_name"],
            "category": category,
            "product_description": values["product_description"],
            "price": price,
            "price_text": _blank_to_none(values["price"]),
            "location": _blank_to_none(values["location"]),
            "page_id": _blank_to_none(values.get("page_id")),
            "create_time": created,
        })
    if unparsable_prices:
        notes.append(f"{records.path.name}: {len(unparsable_prices):,} unparsable price(s) stored as NULL with the "
                     f"text kept in price_text ({_line_list(unparsable_prices)})")
    report.unlabelled = len(unlabelled)
    if unlabelled:
        notes.append(f"{records.path.name}: {len(unlabelled):,} product(s) with an empty or blank category, "
                     f"imported unlabelled, with category NULL ({_line_list(unlabelled)})")
    accepted = {row["id"] for row in rows}
    rejected = {r.row_id: r for r in report.rejected if r.row_id and r.row_id not in accepted}
    return rows, rejected


def _image_rows(conn: Connection, records: _Records, report: TableReport, csv_products: set[str],
                rejected_products: dict[str, RejectedRow], products_file: str) -> list[dict[str, Any]]:
    """Database rows from images.csv; images whose product is neither imported nor in the database are rejected."""
    checker = _RowChecker(records, report)
    candidates = [(record, values, values["product_id"].strip()) for record, values in checker.rows()]
    known = csv_products | _existing_ids(
        conn, products, sorted({pid for _, _, pid in candidates if pid and pid not in csv_products}))
    rows: list[dict[str, Any]] = []
    for record, values, product_id in candidates:
        if not product_id:
            checker.reject(record, "empty product_id")
            continue
        if product_id not in known:
            if product_id in rejected_products:
                reason = (f"its product {product_id!r} was rejected "
                          f"({products_file} {rejected_products[product_id].where})")
            else:
                reason = f"product_id {product_id!r} is neither in {products_file} nor in the database"
            checker.reject(record, reason)
            continue
        try:
            created = parse_date(values["create_time"])
        except ValueError:
            checker.reject(record, f"create_time {values['create_time']!r} is not a dd/mm/yyyy date")
            continue
        rows.append({
            "id": record.row_id,
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
               progress: bool = True, max_record_lines: int = MAX_RECORD_LINES) -> ImportReport:
    """Import the two CSV files into ``db_url`` (None: ``settings.default_db_url()``); see the module docstring.

    ``max_record_lines`` is the most physical lines one record may span (a quoted field still open after
    that many lines is an unbalanced quote). Raises ``DataConfigError`` for a limit below 1,
    ``ImportFileError`` for an unreadable file or missing columns (nothing is written then) and
    ``DatabaseError`` when the database fails (the transaction is rolled back).
    """
    if max_record_lines < 1:
        raise DataConfigError(f"max_record_lines must be at least 1, not {max_record_lines}")
    product_records = _read_records(Path(products_csv), PRODUCT_COLUMNS, PRODUCT_OPTIONAL_COLUMNS,
                                    max_record_lines=max_record_lines)
    image_records = _read_records(Path(images_csv), IMAGE_COLUMNS, max_record_lines=max_record_lines)
    # Both headers have been checked before the database is touched.
    engine = open_engine(db_url, create=True)
    shown = mask_url(engine.url)
    report = ImportReport(
        database=shown,
        products=TableReport("products", str(product_records.path)),
        images=TableReport("images", str(image_records.path)),
        notes=product_records.notes + image_records.notes,
    )
    product_rows, rejected_products = _product_rows(product_records, report.products, report.notes)
    table = "products"
    try:
        create_schema(engine)
        with engine.begin() as conn:
            _upsert(conn, products, product_rows, report.products, progress)
            image_rows = _image_rows(conn, image_records, report.images, {row["id"] for row in product_rows},
                                     rejected_products, product_records.path.name)
            table = "images"
            _upsert(conn, images, image_rows, report.images, progress)
            for table_report, table_obj in ((report.products, products), (report.images, images)):
                table_report.rows_in_database = conn.execute(select(func.count()).select_from(table_obj)).scalar_one()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"import into {shown} failed while writing table {table!r} "
                            f"(nothing was written): {describe_db_error(exc)}") from exc
    finally:
        engine.dispose()
    for table_report in (report.products, report.images):
        table_report.rejected.sort(key=lambda r: r.first_line)
        table_report.check()
    return report
