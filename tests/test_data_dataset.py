"""load_marketplace(): labels, clean text, excluded products, photos, splits and the summary."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from PIL import Image

from marketplace_reco import settings
from marketplace_reco.data.dataset import Marketplace, load_marketplace, root_category
from marketplace_reco.data.errors import DatabaseError, DataError, ImageStoreUnreachableError
from marketplace_reco.data.image_store import open_image_store
from marketplace_reco.data.importer import import_csv

CLASSES = ["Appliances", "Home & Garden", "Video Games & Consoles"]
N_PER_CLASS = 10


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture
def market(tmp_path: Path) -> tuple[str, Path]:
    """A database and photo folder written through the importer: 30 usable products and 3 that are not."""
    products = [",id,product_name,category,product_description,price,location"]
    images = [",id,product_id,bucket_link,image_ref,create_time"]
    store = open_image_store(tmp_path / "images", create=True)
    for c, label in enumerate(CLASSES):
        for i in range(N_PER_CLASS):
            pid = f"p{c}{i:02d}"
            products.append(f'{len(products)},{pid},"Item {pid} | in Leeds, West Yorkshire | Gumtree",'
                            f'"{label} / Sub / Leaf",Nice\rthingWorks,£{i}.00,"Leeds, West Yorkshire"')
            # Products p?09 have no photo; the others one or two.
            for k in range(0 if i == 9 else 1 + i % 2):
                image_id = f"i{c}{i:02d}{k}"
                images.append(f"{len(images)},{image_id},{pid},link,ref,26/02/2022")
                store.put(image_id, _jpeg((80 * c, 20 * i, 100)))
    products += [
        f"{len(products)},x-nolabel,Mystery | in Leeds | Gumtree,,Something,£1.00,Leeds",
        f"{len(products) + 1},x-notext, | in Leeds | Gumtree,Appliances / Kettles,\r👉 ,£1.00,Leeds",
        f"{len(products) + 2},x-blank,Thing,   / Sub,Something,£1.00,Leeds",
    ]
    images.append(f"{len(images)},i-excluded,x-nolabel,link,ref,26/02/2022")
    (tmp_path / "products.csv").write_text("\n".join(products) + "\n", encoding="utf-8")
    (tmp_path / "images.csv").write_text("\n".join(images) + "\n", encoding="utf-8")
    db_url = f"sqlite:///{tmp_path / 'market.db'}"
    report = import_csv(tmp_path / "products.csv", tmp_path / "images.csv", db_url, progress=False)
    assert not report.products.rejected and not report.images.rejected
    return db_url, tmp_path / "images"


def test_products_labels_and_text(market: tuple[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        m = load_marketplace(*map(str, market))
    assert list(m.products.columns) == ["product_id", "text", "label", "image_ids"]
    assert m.classes == CLASSES
    assert len(m.products) == len(CLASSES) * N_PER_CLASS
    first = m.products.set_index("product_id").loc["p000"]
    assert first["label"] == "Appliances"
    assert first["text"] == "Item p000 Nice thing Works"
    assert first["image_ids"] == ["i0000"]
    assert m.products.set_index("product_id").loc["p101", "image_ids"] == ["i1010", "i1011"]
    assert m.products.set_index("product_id").loc["p009", "image_ids"] == []
    assert m.label_indices.tolist() == [i // N_PER_CLASS for i in range(len(m.products))]
    assert "3 product(s) left out (2 no label, 1 no text)" in caplog.text


def test_excluded_products_are_reported_in_the_summary(market: tuple[str, Path]) -> None:
    m = load_marketplace(*map(str, market))
    assert sorted(map(tuple, m.excluded.to_numpy())) == [
        ("x-blank", "no label"), ("x-nolabel", "no label"), ("x-notext", "no text")]
    summary = m.summary()
    assert summary == {
        "products": 30,
        "images": sum(1 + i % 2 for i in range(N_PER_CLASS - 1)) * len(CLASSES),
        "products_without_images": len(CLASSES),
        "classes": dict.fromkeys(CLASSES, N_PER_CLASS),
        "excluded": {"products": 3, "reasons": {"no label": 2, "no text": 1}},
        "source": {"database": market[0], "images": str(market[1])},
    }


def test_images_frame_and_loading_photos(market: tuple[str, Path]) -> None:
    m = load_marketplace(*map(str, market))
    frame = m.images_frame()
    assert list(frame.columns) == ["image_id", "product_id", "label"]
    assert len(frame) == m.summary()["images"]
    assert "i-excluded" not in set(frame["image_id"])
    photos = m.load_images(["i2031", "i0000"])
    assert [p.mode for p in photos] == ["RGB", "RGB"]
    assert photos[0].getpixel((8, 8))[0] > 140 > photos[1].getpixel((8, 8))[0]


def test_split_keeps_every_photo_of_a_product_together(market: tuple[str, Path]) -> None:
    m = load_marketplace(*map(str, market))
    parts = m.split((0.6, 0.2, 0.2), seed=3)
    assert set(parts) == {"train", "val", "test"}
    ids = {name: set(part.products["product_id"]) for name, part in parts.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert set.union(*ids.values()) == set(m.products["product_id"])
    photos = {name: set(part.images_frame()["image_id"]) for name, part in parts.items()}
    assert sum(map(len, photos.values())) == len(m.images_frame())
    for name, part in parts.items():
        owner = dict(zip(m.images_frame()["image_id"], m.images_frame()["product_id"]))
        assert {owner[i] for i in photos[name]} <= ids[name]
        assert part.classes == CLASSES
        assert part.summary()["classes"] == dict.fromkeys(CLASSES, {"train": 6, "val": 2, "test": 2}[name])
    assert m.split((0.6, 0.2, 0.2), seed=3)["val"].products.equals(parts["val"].products)


def test_subset_of_unknown_products_is_an_error(market: tuple[str, Path]) -> None:
    m = load_marketplace(*map(str, market))
    assert isinstance(m.subset(["p000", "p101"]), Marketplace)
    with pytest.raises(DataError, match=r"1 product id\(s\) not in this marketplace, e.g. \['x-nolabel'\]"):
        m.subset(["p000", "x-nolabel"])


def test_defaults_come_from_the_environment(market: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPLACE_DB_URL", market[0])
    monkeypatch.setenv("MARKETPLACE_IMAGES", str(market[1]))
    assert load_marketplace().summary()["source"] == {"database": market[0], "images": str(market[1])}


def test_settings_default_to_folders_under_the_working_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for variable in ("MARKETPLACE_DB_URL", "MARKETPLACE_IMAGES", "MARKETPLACE_CHECKPOINTS", "MARKETPLACE_REPORTS",
                     "MARKETPLACE_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    assert settings.default_db_url() == f"sqlite:///{tmp_path / 'data' / 'marketplace.db'}"
    assert settings.default_image_location() == str(tmp_path / "data" / "images")
    assert settings.checkpoints_dir() == tmp_path / "checkpoints"
    assert settings.reports_dir() == tmp_path / "reports"
    assert settings.cache_dir() == tmp_path / ".cache"
    monkeypatch.setenv("MARKETPLACE_CACHE", "elsewhere")
    assert settings.cache_dir() == tmp_path / "elsewhere"


def test_missing_database_or_photos_are_clear_errors(market: tuple[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="does not exist"):
        load_marketplace(f"sqlite:///{tmp_path / 'nope.db'}", str(market[1]))
    with pytest.raises(ImageStoreUnreachableError, match="folder does not exist"):
        load_marketplace(market[0], str(tmp_path / "no-photos"))


@pytest.mark.parametrize(("category", "root"), [
    ("Home & Garden / Dining, Living Room Furniture / Mirrors", "Home & Garden"),
    ("Appliances", "Appliances"), ("  Other Goods  /x", "Other Goods"), ("", None), (" / Sub", None), (None, None),
])
def test_root_category(category: str | None, root: str | None) -> None:
    assert root_category(category) == root
