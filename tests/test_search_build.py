"""Listing embeddings (``embed`` of every torch model) and building indexes from the sample marketplace: FAISS and
pgvector, saved and loaded by name, incremental updates, the model-revision check, and the scripts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import delete, insert, update

from marketplace_reco.data.database import open_engine
from marketplace_reco.data.dataset import Marketplace
from marketplace_reco.data.image_store import open_image_store
from marketplace_reco.data.images import load_image
from marketplace_reco.data.sample import make_sample_marketplace
from marketplace_reco.data.schema import images, products
from marketplace_reco.models import ModelConfigError, create_model, load_model
from marketplace_reco.models.fusion import FusionClassifier
from marketplace_reco.search import FaissListingIndex, IndexConfigError, ModelMismatchError
from marketplace_reco.search.build import build_index, embedding_spec, load_index
from marketplace_reco.search.catalogue import read_catalogue
from marketplace_reco.search.pgvector_index import PgvectorListingIndex
from search_models import FUSION_MODEL, IMAGE_MODEL, TEXT_MODEL

REPO_ROOT = Path(__file__).resolve().parents[1]


def photo(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], colour[1], 255 - colour[2]), (5, 5, size[0] // 2, size[1] // 2))
    return image


RED, GREEN, BLUE = photo((200, 30, 30)), photo((30, 200, 60)), photo((20, 40, 220))


@pytest.fixture(scope="module")
def models(embedding_checkpoints: Path) -> dict[str, object]:
    return {name: load_model(str(embedding_checkpoints / name)) for name in (IMAGE_MODEL, TEXT_MODEL, FUSION_MODEL)}


@pytest.fixture
def sample_copy(sample_data: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A private copy of the sample database (the photos are shared, read-only)."""
    database = tmp_path / "marketplace.db"
    shutil.copy(sample_data["db_url"].removeprefix("sqlite:///"), database)
    return {"db_url": f"sqlite:///{database}", "image_location": sample_data["image_location"]}


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# ---- embed --------------------------------------------------------------------------------------------------
def test_an_image_listing_vector_is_its_photos_mean_pooled_backbone_output_normalised(models: dict) -> None:
    model = models[IMAGE_MODEL]
    vectors = model.embed(images=[[RED, GREEN], BLUE])
    features = model.photo_vectors([RED, GREEN, BLUE])
    assert features.shape[1] == model.embedding_dim == model.backbone.num_features  # before the feature layer
    expected = unit_rows(np.stack([features[:2].mean(axis=0), features[2]]))
    assert vectors.shape == (2, model.embedding_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(model.embed(images=[[GREEN, RED]]), vectors[:1], atol=1e-5)  # order of photos
    with pytest.raises(ModelConfigError, match="listing 1 has none"):
        model.embed(images=[RED, []])


def test_a_text_vector_is_the_feature_layer_normalised_and_batch_independent(models: dict,
                                                                            sample_marketplace: Marketplace) -> None:
    model = models[TEXT_MODEL]
    texts = sample_marketplace.products["text"].tolist()[:40]
    vectors = model.embed(texts=texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, unit_rows(model.extract_features(texts)), atol=1e-5)
    np.testing.assert_allclose(model.embed(texts=texts[3:4]), vectors[3:4], atol=1e-5)
    assert vectors.shape[1] == model.embedding_dim


def test_a_fusion_vector_joins_the_branch_vectors_and_keeps_a_listing_with_one_input(models: dict) -> None:
    model: FusionClassifier = models[FUSION_MODEL]
    text = "Grey sofa with cushions, good condition"
    both, photo_only, text_only = model.embed(images=[[RED, GREEN], RED, None], texts=[text, None, text])
    image_part = model.image_branch.embed(images=[[RED, GREEN], RED])
    text_part = model.text_branch.embed(texts=[text])[0]
    cut = model.image_branch.embedding_dim
    assert model.embedding_dim == cut + model.text_branch.embedding_dim == len(both)
    np.testing.assert_allclose(both, np.concatenate([image_part[0], text_part]) / np.sqrt(2), atol=1e-5)
    np.testing.assert_allclose(photo_only, np.concatenate([image_part[1], np.zeros_like(text_part)]), atol=1e-5)
    np.testing.assert_allclose(text_only, np.concatenate([np.zeros(cut), text_part]), atol=1e-5)
    for vector in (both, photo_only, text_only):
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ModelConfigError, match="listing 0 has neither a photo nor a text"):
        model.embed(images=[None], texts=["  "])


def test_a_model_without_embed_cannot_build_an_index() -> None:
    with pytest.raises(IndexConfigError, match="has no embed"):
        embedding_spec(create_model("hog-svm", classes=["a", "b"]))


# ---- building -----------------------------------------------------------------------------------------------
def test_build_a_faiss_text_index_save_it_and_load_it_by_name(embedding_checkpoints: Path, sample_copy: dict,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              models: dict) -> None:
    monkeypatch.setenv("MARKETPLACE_CHECKPOINTS", str(embedding_checkpoints))
    index, report = build_index(TEXT_MODEL, **sample_copy, target="text-index", progress=False)
    catalogue = read_catalogue(open_engine(sample_copy["db_url"]))
    assert report.added == len(index) == len(catalogue) and report.deleted == report.refreshed == 0
    assert index.embedding.model_name == TEXT_MODEL and index.embedding.encodes == "text"
    assert index.embedding.model_revision == models[TEXT_MODEL].source["revision"]
    loaded = load_index("text-index")
    assert isinstance(loaded, FaissListingIndex) and sorted(loaded.listing_ids()) == catalogue["listing_id"].tolist()
    row = catalogue.iloc[7]
    np.testing.assert_allclose(loaded.get_vectors([row["listing_id"]]),
                               models[TEXT_MODEL].embed(texts=[row["text"]]), atol=1e-5)
    # A trained text model: most neighbours of a listing share its root category (chance is about 1/13).
    roots = catalogue.set_index("listing_id")["category"].str.split(" / ").str[0]
    ids = catalogue["listing_id"].tolist()
    results = loaded.search(loaded.get_vectors(ids), 5, exclude_ids=[[i] for i in ids])
    precision = np.mean([roots[n.listing_id] == roots[i] for i, found in zip(ids, results) for n in found])
    assert precision > 0.3


def test_an_update_embeds_only_new_and_refreshed_listings_and_deletes_gone_ones(
        embedding_checkpoints: Path, sample_copy: dict, tmp_path: Path, models: dict) -> None:
    target = str(tmp_path / "image-index")
    model = models[IMAGE_MODEL]
    index, first = build_index(model, **sample_copy, target=target, progress=False)
    engine = open_engine(sample_copy["db_url"])
    catalogue = read_catalogue(engine)
    several = catalogue[catalogue["image_ids"].map(len) >= 2]
    gone, changed = catalogue["listing_id"].iloc[0], several["listing_id"].iloc[-1]
    moved_photo = several["image_ids"].iloc[-1][0]
    before = index.get_vectors([changed])
    with engine.begin() as conn:
        conn.execute(delete(images).where(images.c.product_id == gone))
        conn.execute(delete(products).where(products.c.id == gone))
        conn.execute(insert(products).values(id="new-listing", product_name="New listing", category="Other"))
        conn.execute(update(images).where(images.c.id == moved_photo).values(product_id="new-listing"))
    calls = []
    original = type(model).embed
    model.embed = lambda **inputs: calls.append(inputs) or original(model, **inputs)  # count what is embedded
    index, report = build_index(model, **sample_copy, target=target, refresh_ids=[changed], progress=False)
    embedded = sum(len(inputs["images"]) for inputs in calls)
    assert (report.added, report.refreshed, report.deleted) == (1, 1, 1) and embedded == 2
    assert report.unchanged == first.added - 2
    assert gone not in index and "new-listing" in index and len(index) == first.added
    assert not np.allclose(index.get_vectors([changed]), before)  # its photos changed: one went to new-listing
    np.testing.assert_allclose(load_index(target).get_vectors(["new-listing"]),
                               original(model, images=[[photo_of(sample_copy, moved_photo)]]), atol=1e-5)


def photo_of(locations: dict[str, str], image_id: str) -> Image.Image:
    return load_image(open_image_store(locations["image_location"]).get(image_id))


def test_updating_with_another_model_revision_is_refused(embedding_checkpoints: Path, sample_copy: dict,
                                                         tmp_path: Path, models: dict) -> None:
    target = str(tmp_path / "text-index")
    build_index(models[TEXT_MODEL], **sample_copy, target=target, progress=False)
    retrained = load_model(str(embedding_checkpoints / TEXT_MODEL))
    retrained.source = {**retrained.source, "revision": "another-revision"}
    with pytest.raises(ModelMismatchError, match="revision 'another-revision'.*rebuild the index"):
        build_index(retrained, **sample_copy, target=target, progress=False)
    index, report = build_index(retrained, **sample_copy, target=target, rebuild=True, progress=False)
    assert index.embedding.model_revision == "another-revision" and report.added == len(index)


def test_build_a_pgvector_fusion_index_beside_the_products(pgvector_url: str, tmp_path: Path, models: dict) -> None:
    make_sample_marketplace(pgvector_url, tmp_path / "images", n_products=39, seed=1, progress=False)
    index, report = build_index(models[FUSION_MODEL], db_url=pgvector_url, image_location=str(tmp_path / "images"),
                                backend="pgvector", progress=False)
    assert isinstance(index, PgvectorListingIndex) and report.added == len(index) == 39
    reopened = load_index("pgvector:listing_embeddings", db_url=pgvector_url)
    assert reopened.embedding == index.embedding and reopened.embedding.encodes == "image+text"
    assert reopened.kind == "hnsw"  # loaded exact, then the graph built once
    listing = sorted(reopened.listing_ids())[5]
    found = reopened.search(reopened.get_vectors([listing]), 5, exclude_ids=[[listing]])[0]
    assert len(found) == 5 and listing not in {n.listing_id for n in found}
    _, again = build_index(models[FUSION_MODEL], db_url=pgvector_url, image_location=str(tmp_path / "images"),
                           backend="pgvector", progress=False)
    assert (again.added, again.refreshed, again.deleted, again.unchanged) == (0, 0, 0, 39)


# ---- scripts ------------------------------------------------------------------------------------------------
def _run(args: list[str], checkpoints: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {"MARKETPLACE_CHECKPOINTS": str(checkpoints), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*(launcher or [sys.executable]), *args], check=False, capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=600)


def test_build_index_under_torchrun_merges_the_ranks_shards_then_search_prints_neighbours(
        embedding_checkpoints: Path, sample_copy: dict, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(embedding_checkpoints, checkpoints)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    built = _run(["scripts/build_index.py", "--model", TEXT_MODEL, "--db-url", sample_copy["db_url"],
                  "--images", sample_copy["image_location"], "--index", "text-index"], checkpoints, torchrun)
    assert built.returncode == 0, built.stderr
    assert "added" in built.stdout
    single = _run(["scripts/build_index.py", "--model", TEXT_MODEL, "--db-url", sample_copy["db_url"],
                   "--images", sample_copy["image_location"], "--index", "text-index-1"], checkpoints)
    assert single.returncode == 0, single.stderr
    merged, alone = FaissListingIndex.from_pretrained(str(checkpoints / "text-index")), \
        FaissListingIndex.from_pretrained(str(checkpoints / "text-index-1"))
    ids = sorted(alone.listing_ids())
    assert sorted(merged.listing_ids()) == ids
    np.testing.assert_allclose(merged.get_vectors(ids), alone.get_vectors(ids), atol=1e-5)
    listing = ids[3]
    searched = _run(["scripts/search.py", "--index", "text-index", "--db-url", sample_copy["db_url"],
                     "--listing-id", listing, "-k", "4"], checkpoints)
    assert searched.returncode == 0, searched.stderr
    lines = [line for line in searched.stdout.splitlines() if line.strip()]
    assert len(lines) == 5 and listing in lines[0] and all(listing not in line for line in lines[1:])
    by_text = _run(["scripts/search.py", "--index", "text-index", "--db-url", sample_copy["db_url"],
                    "--text", "oak dining table", "-k", "3"], checkpoints)
    assert by_text.returncode == 0, by_text.stderr
    unknown = _run(["scripts/search.py", "--index", "text-index", "--db-url", sample_copy["db_url"],
                    "--listing-id", "no-such-listing"], checkpoints)
    assert unknown.returncode != 0 and "no-such-listing" in unknown.stderr and "Traceback" not in unknown.stderr


def test_build_index_under_torchrun_each_rank_writes_its_pgvector_rows(embedding_checkpoints: Path,
                                                                       pgvector_url: str, tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_sample_marketplace(pgvector_url, images, n_products=26, seed=3, progress=False)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    built = _run(["scripts/build_index.py", "--model", TEXT_MODEL, "--backend", "pgvector", "--db-url", pgvector_url,
                  "--images", str(images)], embedding_checkpoints, torchrun)
    assert built.returncode == 0, built.stderr
    assert "26 added" in built.stdout
    index = load_index("pgvector:listing_embeddings", db_url=pgvector_url)
    assert len(index) == 26 and index.embedding.model_name == TEXT_MODEL and index.kind == "hnsw"
    catalogue = read_catalogue(open_engine(pgvector_url))
    text_model = load_model(str(embedding_checkpoints / TEXT_MODEL))
    np.testing.assert_allclose(index.get_vectors(catalogue["listing_id"].tolist()),
                               text_model.embed(texts=catalogue["text"].tolist()), atol=1e-5)
