"""The embedded sample marketplace: real files through the real import, deterministic, and built so that
text and photos are each informative but imperfect while the two together are clearly better."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage.feature import hog
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import RidgeClassifier
from sklearn.preprocessing import StandardScaler

from marketplace_reco.data.database import open_engine, read_images, read_products
from marketplace_reco.data.dataset import Marketplace, load_marketplace
from marketplace_reco.data.errors import DataConfigError, DataError
from marketplace_reco.data.images import letterbox
from marketplace_reco.data.sample import CLASSES, PHOTO_SIZE, make_sample_marketplace
from marketplace_reco.data.text import TextPreprocessor

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tables(db_url: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    engine = open_engine(db_url)
    try:
        return read_products(engine), read_images(engine)
    finally:
        engine.dispose()


def _generate(folder: Path, **kwargs: int) -> tuple[str, Path, dict]:
    db_url, images = f"sqlite:///{folder / 'm.db'}", folder / "images"
    return db_url, images, make_sample_marketplace(db_url, images, progress=False, **kwargs)


def test_sample_has_the_13_real_classes_balanced(sample_marketplace: Marketplace) -> None:
    assert sample_marketplace.classes == sorted(CLASSES)
    assert len(CLASSES) == 13
    summary = sample_marketplace.summary()
    assert summary["products"] == 130
    assert set(summary["classes"].values()) == {10}
    assert summary["excluded"]["products"] == 0
    assert sample_marketplace.products["image_ids"].map(len).between(1, 3).all()


def test_sample_looks_like_the_users_export(sample_data: dict[str, str]) -> None:
    products, images = _tables(sample_data["db_url"])
    assert products["product_name"].str.fullmatch(r".+ \| in [^|]+, [^|]+ \| Gumtree").all()
    assert products["category"].str.split(" / ").str[0].isin(CLASSES).all()
    # Prices went through the importer's parser: '£1,250.00' -> 1250.0, 'N/A' -> NULL with the text kept.
    priced = products["price"].notna()
    assert products.loc[priced, "price_text"].str.fullmatch(r"£[\d,]+\.\d\d").all()
    assert (products.loc[~priced, "price_text"] == "N/A").all()
    assert products["product_description"].str.contains("\r").any()  # the export's stray carriage returns
    assert images["create_time"].notna().all()
    assert set(images["product_id"]) <= set(products["id"])


def test_every_photo_exists_and_is_letterboxed(sample_marketplace: Marketplace) -> None:
    image_ids = sample_marketplace.images_frame()["image_id"].tolist()
    photos = sample_marketplace.load_images(image_ids)
    assert all(photo.size == (PHOTO_SIZE, PHOTO_SIZE) and photo.mode == "RGB" for photo in photos)
    # Landscape and portrait shots are padded with black bars, like the real photos.
    corners = np.array([np.asarray(photo)[[0, 0, -1, -1], [0, -1, 0, -1]].max() for photo in photos])
    assert 0.2 < (corners < 16).mean() < 0.95


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    url_a, images_a, summary_a = _generate(tmp_path / "a", n_products=26, seed=5)
    url_b, images_b, summary_b = _generate(tmp_path / "b", n_products=26, seed=5)
    _, _, summary_c = _generate(tmp_path / "c", n_products=26, seed=6)
    products_a, photos_a = _tables(url_a)
    products_b, photos_b = _tables(url_b)
    pd.testing.assert_frame_equal(products_a, products_b)
    # bucket_link names the folder the photo was written to; everything else must match.
    pd.testing.assert_frame_equal(photos_a.drop(columns="bucket_link"), photos_b.drop(columns="bucket_link"))

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.jpg")}

    assert digests(images_a) == digests(images_b)
    assert summary_a["classes"] == summary_b["classes"]
    assert set(_tables(f"sqlite:///{tmp_path / 'c' / 'm.db'}")[0]["id"]).isdisjoint(products_a["id"])


def test_regenerating_into_the_same_place_is_idempotent(tmp_path: Path) -> None:
    db_url, images, first = _generate(tmp_path, n_products=13, seed=2)
    _, _, second = _generate(tmp_path, n_products=13, seed=2)
    assert first["import"]["products_inserted"] == 13
    assert second["import"]["products_inserted"] == 0 and second["import"]["products_unchanged"] == 13
    assert second["import"]["images_unchanged"] == first["import"]["images_inserted"] == first["images"]
    products, photos = _tables(db_url)
    assert len(products) == 13 and len(photos) == first["images"] == len(list(images.glob("*.jpg")))


def test_refuses_to_mix_into_a_database_with_other_products(tmp_path: Path) -> None:
    _generate(tmp_path, n_products=13, seed=0)
    with pytest.raises(DataError, match=r"already holds 13 products that are not this sample"):
        _generate(tmp_path, n_products=13, seed=1)


def test_too_few_products_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match="at least 13"):
        _generate(tmp_path, n_products=12)


def test_script_writes_the_sample_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "scripts" / "make_sample_data.py"), "--db-url",
               f"sqlite:///{tmp_path / 'm.db'}", "--images", str(tmp_path / "images"), "--products", "13",
               "--no-progress"]
    done = subprocess.run([*command, "--seed", "0"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "13 products" in done.stdout and "Video Games & Consoles" in done.stdout
    refused = subprocess.run([*command, "--seed", "1"], capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: database sqlite:///") and refused.stderr.count("\n") == 1


def _image_features(marketplace: Marketplace, image_ids: list[str]) -> np.ndarray:
    """HOG of the grey 32 px photo (shape, texture) plus a 4x4 colour thumbnail (hue)."""
    rows = []
    for photo in marketplace.load_images(image_ids):
        grey = np.asarray(letterbox(photo, 32).convert("L"), dtype=np.float32) / 255
        thumbnail = np.asarray(letterbox(photo, 4), dtype=np.float32).ravel() / 255
        rows.append(np.concatenate([hog(grey, pixels_per_cell=(8, 8), cells_per_block=(2, 2)), thumbnail]))
    return np.stack(rows)


def test_text_and_photos_each_informative_and_better_together(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Linear models on the default-size sample: each modality well above chance (1/13) but imperfect,
    and photo + text features together clearly better than either. (Ridge: seconds, unlike lbfgs.)"""
    db_url, images, _ = _generate(tmp_path_factory.mktemp("informative"))
    parts = load_marketplace(db_url, str(images)).split((0.7, 0.0, 0.3), seed=0)
    frames = {name: part.images_frame().merge(part.products[["product_id", "text"]], on="product_id")
              for name, part in parts.items() if name != "val"}
    tfidf = TfidfVectorizer(analyzer=TextPreprocessor().tokenize).fit(frames["train"]["text"])
    text = {name: tfidf.transform(frame["text"]).toarray() for name, frame in frames.items()}
    scaler = StandardScaler()
    photo = {"train": scaler.fit_transform(_image_features(parts["train"], frames["train"]["image_id"].tolist()))}
    photo["test"] = scaler.transform(_image_features(parts["test"], frames["test"]["image_id"].tolist()))
    # Weights put the two feature sets on a comparable scale (hundreds of HOG values vs a sparse tf-idf row).
    both = {name: np.hstack([0.2 * photo[name], 3.0 * text[name]]) for name in frames}

    def accuracy(features: dict[str, np.ndarray]) -> float:
        model = RidgeClassifier(alpha=10.0).fit(features["train"], frames["train"]["label"])
        return float((model.predict(features["test"]) == frames["test"]["label"]).mean())

    text_acc, photo_acc, both_acc = accuracy(text), accuracy(photo), accuracy(both)
    assert 0.35 < text_acc < 0.85, text_acc
    assert 0.35 < photo_acc < 0.85, photo_acc
    assert both_acc > max(text_acc, photo_acc) + 0.1, (text_acc, photo_acc, both_acc)
