"""The CSV importer on real rows of the users' export, into SQLite and into a real PostgreSQL server."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from marketplace_reco.data.database import open_engine, read_images, read_products
from marketplace_reco.data.dataset import load_marketplace
from marketplace_reco.data.errors import DatabaseError, DataConfigError, ImportFileError
from marketplace_reco.data.importer import ImportReport, RejectedRow, TableReport, import_csv, parse_price
from services import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
N_PRODUCTS = 50


def _lines(path: Path) -> list[bytes]:
    # In this export every record is one '\n'-terminated line (stray '\r's sit inside fields).
    return path.read_bytes().split(b"\n")[:-1]


@pytest.fixture(scope="module")
def export_subset(shared_marketplace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The first products of the real export (some with stray '\\r's) and all their images, bytes untouched."""
    product_lines = _lines(shared_marketplace / "products.csv")
    with_cr = [line for line in product_lines[1:] if b"\r" in line][:10]
    chosen = [line for line in product_lines[1:] if b"\r" not in line][:N_PRODUCTS - len(with_cr)] + with_cr
    ids = {line.split(b",")[1] for line in chosen}
    image_lines = _lines(shared_marketplace / "images.csv")
    chosen_images = [line for line in image_lines[1:] if line.split(b",")[2] in ids]
    folder = tmp_path_factory.mktemp("export")
    (folder / "products.csv").write_bytes(b"\n".join([product_lines[0], *chosen]) + b"\n")
    (folder / "images.csv").write_bytes(b"\n".join([image_lines[0], *chosen_images]) + b"\n")
    return folder / "products.csv", folder / "images.csv"


def _expected(products_csv: Path, images_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same files read by pandas, an independent parser, as the reference."""
    options = {"lineterminator": "\n", "dtype": str, "keep_default_na": False, "index_col": 0}
    return pd.read_csv(products_csv, **options), pd.read_csv(images_csv, **options)


def _check_round_trip(db_url: str, products_csv: Path, images_csv: Path) -> None:
    """Every field the database returns equals the exported one (prices and dates parsed)."""
    expected_products, expected_images = _expected(products_csv, images_csv)
    engine = open_engine(db_url)
    try:
        stored_products = read_products(engine).set_index("id").loc[expected_products["id"]]
        stored_images = read_images(engine).set_index("id").loc[expected_images["id"]]
    finally:
        engine.dispose()
    for column in ("product_name", "category", "product_description", "location"):
        assert stored_products[column].tolist() == expected_products[column].tolist(), column
    assert stored_products["price_text"].tolist() == expected_products["price"].tolist()
    prices = expected_products["price"].str.replace("[£,]", "", regex=True).astype(float)
    assert stored_products["price"].tolist() == pytest.approx(prices.tolist())
    assert stored_images["product_id"].tolist() == expected_images["product_id"].tolist()
    assert stored_images["image_ref"].tolist() == expected_images["image_ref"].tolist()
    dates = pd.to_datetime(expected_images["create_time"], format="%d/%m/%Y")
    assert (stored_images["create_time"].to_numpy() == dates.to_numpy()).all()


def _assert_counts(report: ImportReport, inserted: tuple[int, int], unchanged: tuple[int, int]) -> None:
    for table, n_inserted, n_unchanged in zip((report.products, report.images), inserted, unchanged):
        assert (table.inserted, table.updated, table.unchanged, table.rejected) == (n_inserted, 0, n_unchanged, [])
        assert table.records_read == n_inserted + n_unchanged


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_import_is_faithful_and_idempotent(database: str, export_subset: tuple[Path, Path], tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    products_csv, images_csv = export_subset
    db_url = (f"sqlite:///{tmp_path / 'db' / 'market.db'}" if database == "sqlite"
              else request.getfixturevalue("fresh_postgres_url"))
    n_images = len(_expected(products_csv, images_csv)[1])
    assert n_images > N_PRODUCTS  # most products have two photos

    first = import_csv(products_csv, images_csv, db_url, progress=False)
    _assert_counts(first, inserted=(N_PRODUCTS, n_images), unchanged=(0, 0))
    assert (first.products.rows_in_database, first.images.rows_in_database) == (N_PRODUCTS, n_images)
    _check_round_trip(db_url, products_csv, images_csv)

    second = import_csv(products_csv, images_csv, db_url, progress=False)
    _assert_counts(second, inserted=(0, 0), unchanged=(N_PRODUCTS, n_images))
    assert (second.products.rows_in_database, second.images.rows_in_database) == (N_PRODUCTS, n_images)


def test_stray_carriage_returns_are_kept_inside_fields(export_subset: tuple[Path, Path], tmp_path: Path) -> None:
    products_csv, images_csv = export_subset
    db_url = f"sqlite:///{tmp_path / 'market.db'}"
    import_csv(products_csv, images_csv, db_url, progress=False)
    engine = open_engine(db_url)
    stored = read_products(engine)
    engine.dispose()
    # The fixture picked ten products whose descriptions contain '\r'; none was split into extra rows.
    assert stored["product_description"].str.contains("\r").sum() >= 10
    assert len(stored) == N_PRODUCTS


def test_changed_rows_are_updated(export_subset: tuple[Path, Path], tmp_path: Path) -> None:
    products_csv, images_csv = export_subset
    db_url = f"sqlite:///{tmp_path / 'market.db'}"
    import_csv(products_csv, images_csv, db_url, progress=False)
    lines = _lines(products_csv)
    old_price = _expected(products_csv, images_csv)[0]["price"].iloc[0].encode()
    lines[1] = lines[1].replace(b"," + old_price + b",", ',"£1,250.00",'.encode(), 1)
    assert b"1,250.00" in lines[1]
    changed = tmp_path / "products.csv"
    changed.write_bytes(b"\n".join(lines) + b"\n")

    report = import_csv(changed, images_csv, db_url, progress=False)

    assert (report.products.inserted, report.products.updated, report.products.unchanged) == (0, 1, N_PRODUCTS - 1)
    engine = open_engine(db_url)
    stored = read_products(engine).set_index("id")
    engine.dispose()
    product_id = lines[1].split(b",")[1].decode()
    assert stored.loc[product_id, "price"] == 1250.0
    assert stored.loc[product_id, "price_text"] == "£1,250.00"


def test_rejected_rows_are_reported_with_line_and_reason(export_subset: tuple[Path, Path], tmp_path: Path) -> None:
    products_csv, images_csv = export_subset
    product_lines, image_lines = _lines(products_csv), _lines(images_csv)
    duplicate_product = product_lines[1]
    too_few_fields = b"9999,aaaaaaaa-0000-0000-0000-000000000001,Lamp | in Leeds | Gumtree,Home & Garden"
    bad_products = tmp_path / "products.csv"
    bad_products.write_bytes(b"\n".join([*product_lines, duplicate_product, too_few_fields]) + b"\n")
    unknown_product = (b"9001,bbbbbbbb-0000-0000-0000-000000000001,cccccccc-0000-0000-0000-000000000000,"
                       b"link,ref,26/02/2022")
    bad_date = image_lines[1].rsplit(b",", 1)[0].replace(image_lines[1].split(b",")[1],
                                                         b"bbbbbbbb-0000-0000-0000-000000000002") + b",2022-02-26"
    bad_images = tmp_path / "images.csv"
    bad_images.write_bytes(b"\n".join([*image_lines, unknown_product, bad_date]) + b"\n")

    report = import_csv(bad_products, bad_images, f"sqlite:///{tmp_path / 'market.db'}", progress=False)

    n_images = len(image_lines) - 1
    assert report.products.records_read == N_PRODUCTS + 2
    assert report.products.inserted == N_PRODUCTS
    assert [(r.first_line, r.last_line, r.reason) for r in report.products.rejected] == [
        (N_PRODUCTS + 2, N_PRODUCTS + 2, "duplicate id, first seen on line 2"),
        (N_PRODUCTS + 3, N_PRODUCTS + 3, "expected 7 fields, found 4"),
    ]
    assert report.images.inserted == n_images
    assert [(r.first_line, r.row_id) for r in report.images.rejected] == [
        (n_images + 2, "bbbbbbbb-0000-0000-0000-000000000001"),
        (n_images + 3, "bbbbbbbb-0000-0000-0000-000000000002"),
    ]
    assert "neither in products.csv nor in the database" in report.images.rejected[0].reason
    assert "'2022-02-26' is not a dd/mm/yyyy date" in report.images.rejected[1].reason
    assert report.images.rows_in_database == n_images
    text = str(report)
    assert f"line {n_images + 2} (id bbbbbbbb-0000-0000-0000-000000000001)" in text
    assert "duplicate id" in text

    report.write_rejected_csv(tmp_path / "rejected.csv")
    rejected = pd.read_csv(tmp_path / "rejected.csv")
    assert rejected.columns.tolist() == ["file", "first_line", "last_line", "id", "reason"]
    assert rejected["first_line"].tolist() == [N_PRODUCTS + 2, N_PRODUCTS + 3, n_images + 2, n_images + 3]


PRODUCTS_HEADER = ",id,product_name,category,product_description,price,location"
IMAGES_HEADER = ",id,product_id,bucket_link,image_ref,create_time"


def _product(i: int, description: str = "", category: str = "Home & Garden / Sofas") -> str:
    """Line of products.csv for product p<i>, with a price and a town of its own."""
    return (f"{i},p{i},Item {i} | in Leeds | Gumtree,{category},{description or f'Nice item {i}'},"
            f"£{10 + i}.00,Town {i}")


def _image(i: int, bucket_link: str = "") -> str:
    """Line of images.csv for image i<i> of product p<i>, with a reference of its own."""
    return f"{i},i{i},p{i},{bucket_link or f'link{i}'},ref{i},26/02/2022"


def _import_lines(folder: Path, product_lines: list[str], image_lines: list[str],
                  **options: Any) -> tuple[ImportReport, pd.DataFrame, pd.DataFrame]:
    """Write the two files, import them into a new SQLite database; the report and the stored tables by id."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "products.csv").write_text("\n".join([PRODUCTS_HEADER, *product_lines]) + "\n", encoding="utf-8")
    (folder / "images.csv").write_text("\n".join([IMAGES_HEADER, *image_lines]) + "\n", encoding="utf-8")
    db_url = f"sqlite:///{folder / 'market.db'}"
    report = import_csv(folder / "products.csv", folder / "images.csv", db_url, progress=False, **options)
    engine = open_engine(db_url)
    try:
        return report, read_products(engine).set_index("id"), read_images(engine).set_index("id")
    finally:
        engine.dispose()


def _assert_nothing_lost(table: TableReport, stored: pd.DataFrame) -> None:
    """The report adds up, and every line written for a product p<i> or image i<i> is stored or rejected."""
    lines = Path(table.source).read_text(encoding="utf-8").split("\n")[:-1]
    assert table.physical_lines == len(lines) == 1 + table.blank_lines + table.record_lines
    assert table.records_read == table.inserted + table.updated + table.unchanged + len(table.rejected)
    rejected_lines = {n for r in table.rejected for n in range(r.first_line, r.last_line + 1)}
    for number, line in enumerate(lines[1:], start=2):
        written_id = re.match(r"[^,]*,([pi]\d+),", line)
        if written_id is not None:
            assert number in rejected_lines or written_id[1] in stored.index, (number, line)


def _assert_products_are_their_own(stored: pd.DataFrame, numbers: list[int]) -> None:
    """Products p<i> are stored with their own price, town and description, nothing of another product's."""
    assert sorted(stored.index) == [f"p{i}" for i in numbers]
    for i in numbers:
        assert stored.loc[f"p{i}", ["price_text", "location"]].tolist() == [f"£{10 + i}.00", f"Town {i}"]
        assert "\n" not in stored.loc[f"p{i}", "product_description"]


def test_a_quote_closing_lines_later_costs_only_its_own_product(tmp_path: Path) -> None:
    # Read as one record, the quote opened on line 2 runs to p2's 'Big "oak" desk' and p0 takes p2's price and
    # town, while p1 and p2 vanish: the failure reported in issue 19.
    product_lines = [_product(0, '"Comfy sofa, 6 ft'), _product(1), _product(2, 'Big "oak" desk'),
                     _product(3), _product(4)]

    report, stored, _ = _import_lines(tmp_path, product_lines, [])

    _assert_products_are_their_own(stored, [1, 2, 3, 4])
    assert stored.loc["p2", "product_description"] == 'Big "oak" desk'
    assert [(r.first_line, r.last_line, r.row_id, r.reason) for r in report.products.rejected] == [
        (2, 2, "p0", "unbalanced quote: a quoted field is still open at the end of line 2, "
                     "and line 3 starts a new record"),
    ]
    _assert_nothing_lost(report.products, stored)
    assert "line 2 (id p0): unbalanced quote" in str(report)


def test_a_quote_closing_lines_later_costs_only_its_own_image(tmp_path: Path) -> None:
    # The quote opened in i0's bucket_link closes in i2's, which would give i0 the reference of i2.
    image_lines = [_image(0, '"link0'), _image(1), _image(2, 'li"nk2'), _image(3), _image(4)]

    report, _, stored = _import_lines(tmp_path, [_product(i) for i in range(5)], image_lines)

    assert sorted(stored.index) == ["i1", "i2", "i3", "i4"]
    assert stored["image_ref"].tolist() == ["ref1", "ref2", "ref3", "ref4"]
    assert stored.loc["i2", "bucket_link"] == 'li"nk2'
    assert [(r.first_line, r.last_line, r.row_id) for r in report.images.rejected] == [(2, 2, "i0")]
    assert "line 3 starts a new record" in report.images.rejected[0].reason
    _assert_nothing_lost(report.images, stored)


@pytest.mark.parametrize(("product_lines", "rejected"), [
    # Read as one record, this quote would run to the end of the file and take p2, p3 and p4 with it.
    ([_product(0), _product(1, '"Comfy sofa, 6 ft'), _product(2), _product(3), _product(4)],
     [(3, 3, "p1", "unbalanced quote: a quoted field is still open at the end of line 3, "
                   "and line 4 starts a new record")]),
    ([_product(0), _product(1), _product(2), _product(3), _product(4, '"Comfy sofa'), "six feet wide", "blue"],
     [(6, 8, "p4", "unbalanced quote: a quoted field is still open at the end of the file")]),
], ids=["in-a-middle-record", "in-the-last-record"])
def test_a_quote_never_closed_costs_only_its_own_product(product_lines: list[str],
                                                         rejected: list[tuple[int, int, str, str]],
                                                         tmp_path: Path) -> None:
    report, stored, _ = _import_lines(tmp_path, product_lines, [])

    kept = [i for i in range(5) if f"p{i}" not in {row_id for _, _, row_id, _ in rejected}]
    _assert_products_are_their_own(stored, kept)
    assert [(r.first_line, r.last_line, r.row_id, r.reason) for r in report.products.rejected] == rejected
    _assert_nothing_lost(report.products, stored)


def test_an_image_quote_never_closed_costs_only_its_own_image(tmp_path: Path) -> None:
    image_lines = [_image(0), _image(1, '"link1'), _image(2), _image(3), _image(4)]

    report, _, stored = _import_lines(tmp_path, [_product(i) for i in range(5)], image_lines)

    assert stored["image_ref"].tolist() == ["ref0", "ref2", "ref3", "ref4"]
    assert [(r.first_line, r.last_line, r.row_id) for r in report.images.rejected] == [(3, 3, "i1")]
    _assert_nothing_lost(report.images, stored)


@pytest.mark.parametrize(("table", "broken_line", "reason"), [
    ("products", _product(1, '"Sofa 6" wide"'), "malformed CSV on line 3: ',' expected after '\"'"),
    ("products", _product(1, "Sofa, 6 ft wide"), "expected 7 fields, found 8"),
    ("products", "x1," + _product(1).split(",", 1)[1], "not part of any record"),
    ("products", _product(1).replace("p1", "p 1", 1), "not part of any record"),
    ("images", _image(1, '"link1"x'), "malformed CSV on line 3: ',' expected after '\"'"),
    ("images", _image(1) + ",extra", "expected 6 fields, found 7"),
    ("images", _image(1).replace("i1", "i/1", 1), "not part of any record"),
], ids=["malformed-quote", "extra-field", "index-not-a-number", "id-with-a-space",
        "image-malformed-quote", "image-extra-field", "image-id-with-a-slash"])
def test_a_line_of_the_wrong_shape_costs_only_itself(table: str, broken_line: str, reason: str,
                                                     tmp_path: Path) -> None:
    product_lines = [_product(i) for i in range(4)]
    image_lines = [_image(i) for i in range(4)]
    (product_lines if table == "products" else image_lines)[1] = broken_line

    report, stored_products, stored_images = _import_lines(tmp_path, product_lines, image_lines)

    table_report = report.products if table == "products" else report.images
    assert [(r.first_line, r.last_line) for r in table_report.rejected] == [(3, 3)]
    assert reason in table_report.rejected[0].reason
    _assert_products_are_their_own(stored_products, [0, 2, 3] if table == "products" else [0, 1, 2, 3])
    _assert_nothing_lost(report.products, stored_products)
    _assert_nothing_lost(report.images, stored_images)


def test_multi_line_records_are_kept_up_to_the_limit_and_reading_resumes_after_it(tmp_path: Path) -> None:
    # p1's description spans lines 3-8 (a blank line inside it); a blank line between records is no record.
    product_lines = [_product(0), '1,p1,Item 1 | in Leeds | Gumtree,Home & Garden / Sofas,"Comfy sofa', "",
                     "six feet wide", "blue", "seats three", '",£11.00,Town 1', "", _product(2)]

    report, stored, _ = _import_lines(tmp_path / "default", product_lines, [])

    assert stored.loc["p1", "product_description"] == "Comfy sofa\n\nsix feet wide\nblue\nseats three\n"
    assert stored.loc["p1", ["price_text", "location"]].tolist() == ["£11.00", "Town 1"]
    assert (report.products.inserted, report.products.blank_lines, report.products.record_lines) == (3, 1, 8)
    _assert_nothing_lost(report.products, stored)

    report, stored, _ = _import_lines(tmp_path / "limited", product_lines, [], max_record_lines=3)

    _assert_products_are_their_own(stored, [0, 2])
    assert [(r.first_line, r.last_line, r.row_id) for r in report.products.rejected] == [(3, 5, "p1"), (6, 8, "")]
    assert report.products.rejected[0].reason == ("unbalanced quote: a quoted field is still open after 3 lines, "
                                                  "the most a record may span")
    assert report.products.rejected[1].reason.startswith("not part of any record")
    _assert_nothing_lost(report.products, stored)
    assert "lines 3-5 (id p1): unbalanced quote" in str(report)
    with pytest.raises(DataConfigError, match="max_record_lines must be at least 1, not 0"):
        import_csv(tmp_path / "limited" / "products.csv", tmp_path / "limited" / "images.csv",
                   f"sqlite:///{tmp_path / 'unused.db'}", progress=False, max_record_lines=0)


def test_empty_and_blank_categories_are_kept_and_counted_as_unlabelled(tmp_path: Path) -> None:
    product_lines = [_product(0), _product(1, category=""), _product(2, category="   "), _product(3),
                     _product(4, category="\r")]

    report, stored, _ = _import_lines(tmp_path, product_lines, [])

    _assert_products_are_their_own(stored, [0, 1, 2, 3, 4])
    assert stored["category"].isna().tolist() == [False, True, True, False, True]
    assert report.products.unlabelled == 3
    assert ("products.csv: 3 product(s) with an empty or blank category, imported unlabelled, with category NULL "
            "(lines 3, 4, 6)") in report.notes
    table_rows = str(report).splitlines()[2:4]
    assert table_rows[0].split()[-2:] == ["3", "5"] and table_rows[1].split()[-2:] == ["-", "0"]


def test_a_report_that_does_not_add_up_is_refused_not_printed() -> None:
    products_table = TableReport("products", "products.csv", physical_lines=4, record_lines=3, records_read=3,
                                 inserted=2, rejected=[RejectedRow(3, 3, "p1", "expected 7 fields, found 4")])
    report = ImportReport("sqlite://", products_table, TableReport("images", "images.csv", physical_lines=1))
    assert "products.csv: 4 lines = 1 header + 0 blank + 3 in records; 3 records = 2 imported + 1 rejected" \
        in str(report)

    products_table.inserted = 1  # a record neither imported nor rejected
    with pytest.raises(AssertionError, match=r"3 records = 1 imported \+ 1 rejected"):
        str(report)
    products_table.inserted, products_table.physical_lines = 2, 5  # a line in no record
    with pytest.raises(AssertionError, match=r"5 lines = 1 header \+ 0 blank \+ 3 in records"):
        str(report)


def test_images_of_a_product_already_in_the_database_are_accepted(export_subset: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    products_csv, images_csv = export_subset
    db_url = f"sqlite:///{tmp_path / 'market.db'}"
    import_csv(products_csv, images_csv, db_url, progress=False)
    header_only = tmp_path / "no_products.csv"
    header_only.write_bytes(_lines(products_csv)[0] + b"\n")

    report = import_csv(header_only, images_csv, db_url, progress=False)

    assert report.images.rejected == []
    assert report.images.unchanged == report.images.records_read > 0


def test_prices_na_and_unparsable_are_null_with_the_text_kept(tmp_path: Path) -> None:
    products_csv = tmp_path / "products.csv"
    products_csv.write_text(
        ",id,product_name,category,product_description,price,location\n"
        "0,p1,Sofa | in Leeds | Gumtree,Home & Garden / Sofas,Nice,N/A,Leeds\n"
        "1,p2,Chair | in Leeds | Gumtree,Home & Garden / Chairs,Nice,Free to collector,Leeds\n"
        '2,p3,Desk | in Leeds | Gumtree,Office Furniture & Equipment,Big,"£1,250.00",Leeds\n',
        encoding="utf-8",
    )
    images_csv = tmp_path / "images.csv"
    images_csv.write_text(",id,product_id,bucket_link,image_ref,create_time\n", encoding="utf-8")

    report = import_csv(products_csv, images_csv, f"sqlite:///{tmp_path / 'market.db'}", progress=False)

    assert report.products.inserted == 3
    assert any("1 unparsable price" in note and "(line 3)" in note for note in report.notes)
    engine = open_engine(f"sqlite:///{tmp_path / 'market.db'}")
    stored = read_products(engine).set_index("id")
    engine.dispose()
    assert pd.isna(stored.loc["p1", "price"]) and stored.loc["p1", "price_text"] == "N/A"
    assert pd.isna(stored.loc["p2", "price"]) and stored.loc["p2", "price_text"] == "Free to collector"
    assert stored.loc["p3", "price"] == 1250.0


@pytest.mark.parametrize(("text", "expected"), [
    ("£1,250.00", Decimal("1250.00")), ("£20.00", Decimal("20.00")), ("£5", Decimal("5")),
    ("  £0.99 ", Decimal("0.99")), ("N/A", None), ("", None), ("£", None), ("twenty", None), ("£1.234", None),
])
def test_parse_price(text: str, expected: Decimal | None) -> None:
    assert parse_price(text) == expected


def test_non_utf8_bytes_are_read_as_windows_1252_and_noted(tmp_path: Path) -> None:
    products_csv = tmp_path / "products.csv"
    products_csv.write_bytes(b",id,product_name,category,product_description,price,location\n"
                             b"0,p1,Caf\xe9 table | in Leeds | Gumtree,Home & Garden,Nice,\xa320.00,Leeds\n")
    images_csv = tmp_path / "images.csv"
    images_csv.write_text(",id,product_id,bucket_link,image_ref,create_time\n0,i1,p1,l,r,01/02/2022\n")
    db_url = f"sqlite:///{tmp_path / 'market.db'}"

    report = import_csv(products_csv, images_csv, db_url, progress=False)

    assert any("products.csv: not valid UTF-8" in note for note in report.notes)
    engine = open_engine(db_url)
    stored = read_products(engine).iloc[0]
    images = read_images(engine)
    engine.dispose()
    assert stored["product_name"].startswith("Café table")
    assert stored["price"] == 20.0
    assert images["create_time"].dt.date.tolist() == [date(2022, 2, 1)]


def test_missing_column_and_missing_file_are_clear_errors(tmp_path: Path) -> None:
    products_csv = tmp_path / "products.csv"
    products_csv.write_text(",id,product_name,category,price,location\n0,p1,a,b,c,d\n")
    images_csv = tmp_path / "images.csv"
    images_csv.write_text(",id,product_id,bucket_link,image_ref,create_time\n")
    with pytest.raises(ImportFileError, match=r"products\.csv: missing column\(s\) product_description"):
        import_csv(products_csv, images_csv, f"sqlite:///{tmp_path / 'market.db'}", progress=False)
    with pytest.raises(ImportFileError, match=r"cannot read CSV file .*nope\.csv"):
        import_csv(tmp_path / "nope.csv", images_csv, f"sqlite:///{tmp_path / 'market.db'}", progress=False)
    assert not (tmp_path / "market.db").exists()


def test_unreachable_database_names_the_url_without_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg2://reader:s3cret@127.0.0.1:{free_port()}/market"
    with pytest.raises(DatabaseError) as raised:
        open_engine(url)
    message = str(raised.value)
    assert "127.0.0.1" in message and "reader:***@" in message and "s3cret" not in message


def test_reading_a_database_without_tables_names_the_table(fresh_postgres_url: str) -> None:
    engine = open_engine(fresh_postgres_url)
    with pytest.raises(DatabaseError, match="table 'products' not found in database postgresql"):
        read_products(engine)
    engine.dispose()


def test_reading_a_missing_sqlite_file_is_an_error_not_a_new_database(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match=r"file .*missing\.db does not exist"):
        open_engine(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_full_shared_export_keeps_every_row(shared_marketplace: Path, tmp_path: Path) -> None:
    products_csv, images_csv = shared_marketplace / "products.csv", shared_marketplace / "images.csv"
    expected_products, expected_images = _expected(products_csv, images_csv)

    report = import_csv(products_csv, images_csv, f"sqlite:///{tmp_path / 'market.db'}", progress=False)

    assert report.products.rejected == [] and report.images.rejected == []
    assert report.products.rows_in_database == len(expected_products) == 5724
    assert report.images.rows_in_database == len(expected_images) == 10107
    for table, path in ((report.products, products_csv), (report.images, images_csv)):
        assert table.physical_lines == path.read_bytes().count(b"\n") == table.records_read + 1
    assert report.products.unlabelled == 0


def test_script_prints_the_report_and_fails_cleanly(export_subset: tuple[Path, Path], tmp_path: Path) -> None:
    products_csv, images_csv = export_subset
    script = [sys.executable, str(REPO_ROOT / "scripts" / "import_csv.py"), "--no-progress"]
    ok = subprocess.run([*script, "--products", str(products_csv), "--images", str(images_csv),
                         "--db-url", f"sqlite:///{tmp_path / 'market.db'}"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (f"products.csv: {N_PRODUCTS + 1} lines = 1 header + 0 blank + {N_PRODUCTS} in records; "
            f"{N_PRODUCTS} records = {N_PRODUCTS} imported + 0 rejected") in ok.stdout

    no_limit = subprocess.run([*script, "--products", str(products_csv), "--images", str(images_csv),
                               "--max-record-lines", "0"], capture_output=True, text=True)
    assert no_limit.returncode == 1
    assert no_limit.stderr.strip() == "error: max_record_lines must be at least 1, not 0"

    failed = subprocess.run([*script, "--products", str(tmp_path / "nope.csv"), "--images", str(images_csv)],
                            capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [f"error: cannot read CSV file {tmp_path / 'nope.csv'}: "
                                                  "No such file or directory"]


def test_marketplace_is_the_same_from_sqlite_and_postgresql(export_subset: tuple[Path, Path], tmp_path: Path,
                                                            fresh_postgres_url: str, shared_marketplace: Path) -> None:
    products_csv, images_csv = export_subset
    sqlite_url = f"sqlite:///{tmp_path / 'market.db'}"
    for url in (sqlite_url, fresh_postgres_url):
        import_csv(products_csv, images_csv, url, progress=False)
    from_sqlite = load_marketplace(sqlite_url, str(shared_marketplace / "images"))
    from_postgres = load_marketplace(fresh_postgres_url, str(shared_marketplace / "images"))
    assert len(from_sqlite.products) == N_PRODUCTS
    assert from_sqlite.products.equals(from_postgres.products)
    assert from_sqlite.summary()["classes"] == from_postgres.summary()["classes"]
