"""The users' two tables, as SQLAlchemy Core, portable between SQLite and PostgreSQL.

Columns follow the users' database. Two decisions of ours:
- ``price`` is numeric pounds (NULL for ``N/A`` or anything unparsable) and ``price_text`` keeps the
  text as exported (``£1,250.00``), so nothing is lost when a price cannot be parsed.
- ``page_id`` and ``create_time`` of ``products`` are nullable: the CSV export has neither column.
"""

from __future__ import annotations

from sqlalchemy import Column, Date, Engine, ForeignKey, MetaData, Numeric, String, Table, Text

#: The ids a product or an image may have: they become file and object names of the image store, so nothing that
#: could leave a folder or a key prefix (no "/", no leading "."). UUIDs in the users' data.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
# 64 characters leave room for other id schemes than UUIDs without a migration.
_ID = String(64)

metadata = MetaData()

products = Table(
    "products",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("product_name", Text, nullable=False),
    Column("category", Text),
    Column("product_description", Text),
    Column("price", Numeric(12, 2)),
    Column("price_text", Text),
    Column("location", Text),
    Column("page_id", Text),
    Column("create_time", Date),
)

images = Table(
    "images",
    metadata,
    Column("id", _ID, primary_key=True),
    Column("product_id", _ID, ForeignKey("products.id"), nullable=False, index=True),
    Column("bucket_link", Text),
    Column("image_ref", Text),
    Column("create_time", Date),
)


def create_schema(engine: Engine) -> None:
    """Create both tables where they do not exist yet (existing tables and rows are left alone)."""
    metadata.create_all(engine)
