"""``POST /similar`` and ``POST /embed`` over real HTTP: a FAISS fusion index of the sample marketplace built by the
tests' tiny models, every bad query as a 4xx JSON error, an index of another model revision, and the pgvector
backend on the real PostgreSQL server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from marketplace_reco.data.database import open_engine
from marketplace_reco.data.image_store import open_image_store
from marketplace_reco.data.images import load_image
from marketplace_reco.data.sample import make_sample_marketplace
from marketplace_reco.models import create_model, load_model
from marketplace_reco.search import MAX_K
from marketplace_reco.search.build import build_index
from marketplace_reco.search.catalogue import read_catalogue
from marketplace_reco.serving import ServingSettings, create_app
from search_models import FUSION_MODEL, IMAGE_MODEL, TEXT_MODEL
from test_serving_http import LoopbackServer, error_message

FUSION_INDEX = "fusion-index"


@pytest.fixture(scope="module")
def sample(sample_data: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("similar-sample")
    shutil.copy(sample_data["db_url"].removeprefix("sqlite:///"), folder / "marketplace.db")
    return {"db_url": f"sqlite:///{folder / 'marketplace.db'}", "image_location": sample_data["image_location"]}


@pytest.fixture(scope="module")
def checkpoints(embedding_checkpoints: Path, sample: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny models and a FAISS index of the fusion model, all in one checkpoints folder."""
    folder = tmp_path_factory.mktemp("similar-checkpoints") / "checkpoints"
    shutil.copytree(embedding_checkpoints, folder)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(folder))
        build_index(FUSION_MODEL, **sample, target=FUSION_INDEX, progress=False)
        yield folder


def settings_for(checkpoints: Path, **overrides: object) -> ServingSettings:
    values = {"text_model": TEXT_MODEL, "image_model": IMAGE_MODEL, "combined_model": FUSION_MODEL,
              "extra_models": ["hog-svm"], "max_items_per_request": 8, "max_batch_size": 16, "max_batch_wait_ms": 20,
              "torch_threads": 1, **overrides}
    return ServingSettings(**values)


@pytest.fixture(scope="module")
def server(checkpoints: Path, sample: dict[str, str]) -> Iterator[LoopbackServer]:
    create_model("hog-svm", classes=["a", "b"]).save_pretrained(checkpoints / "hog-svm")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
        settings = settings_for(checkpoints, index=FUSION_INDEX, db_url=sample["db_url"])
        with LoopbackServer(create_app(settings)) as running:
            running.wait_ready()
            yield running


@pytest.fixture
def client(server: LoopbackServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def catalogue(sample: dict[str, str]):  # type: ignore[no-untyped-def]
    return read_catalogue(open_engine(sample["db_url"])).set_index("listing_id")


def photo_bytes(sample: dict[str, str], image_id: str) -> bytes:
    return open_image_store(sample["image_location"]).get(image_id)


def check_listings(results: list[dict], catalogue, k: int, excluded: str | None = None) -> None:  # type: ignore[no-untyped-def]
    ids = [item["listing_id"] for item in results]
    assert len(ids) == k and len(set(ids)) == k and excluded not in ids
    scores = [item["score"] for item in results]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= score <= 1.0001 for score in scores)
    for item in results:
        row = catalogue.loc[item["listing_id"]]
        assert item["name"] == row["name"] and item["category"] == row["category"]
        assert item["image_ids"] == row["image_ids"]
        assert item["price"] == (None if np.isnan(row["price"]) else pytest.approx(row["price"]))


# ---- answers ------------------------------------------------------------------------------------------------
def test_similar_to_a_listing_never_answers_itself(client: httpx.Client, catalogue, checkpoints: Path) -> None:  # type: ignore[no-untyped-def]
    listing = catalogue.index[10]
    response = client.post("/similar", json={"listing_id": listing, "k": 7})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == FUSION_MODEL and answer["index"] == FUSION_INDEX and answer["query_listing_id"] == listing
    assert answer["revision"] == load_model(str(checkpoints / FUSION_MODEL)).source["revision"]
    check_listings(answer["results"], catalogue, 7, excluded=listing)


def test_a_listings_own_photos_and_text_find_it_first(client: httpx.Client, catalogue, sample: dict) -> None:  # type: ignore[no-untyped-def]
    listing = next(listing_id for listing_id, row in catalogue.iterrows() if len(row["image_ids"]) >= 2)
    row = catalogue.loc[listing]
    files = [("image", (f"{image_id}.jpg", photo_bytes(sample, image_id), "image/jpeg"))
             for image_id in row["image_ids"]]
    response = client.post("/similar", files=files, data={"text": row["text"], "k": "5"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    check_listings(results, catalogue, 5)
    assert results[0]["listing_id"] == listing and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    text_only = client.post("/similar", json={"text": row["text"], "k": 3}).json()["results"]
    photo_only = client.post("/similar", files=files[:1], data={"k": "3"}).json()["results"]
    assert len(text_only) == len(photo_only) == 3


def test_filters_restrict_the_answers(client: httpx.Client, catalogue) -> None:  # type: ignore[no-untyped-def]
    listing = catalogue.index[0]
    root = catalogue.loc[listing, "category"].split(" / ")[0]
    results = client.post("/similar", json={"listing_id": listing, "k": 5, "category": root}).json()["results"]
    assert results and all(item["category"].split(" / ")[0] == root for item in results)
    priced = client.post("/similar", data={"listing_id": listing, "k": "20", "min_price": "10",
                                           "max_price": "200"}).json()["results"]
    assert priced and all(10 <= item["price"] <= 200 for item in priced)


def test_embed_returns_the_models_vector(client: httpx.Client, checkpoints: Path, catalogue, sample: dict) -> None:  # type: ignore[no-untyped-def]
    row = catalogue.iloc[3]
    photo = photo_bytes(sample, row["image_ids"][0])
    answer = client.post("/embed", files={"image": ("p.jpg", photo, "image/jpeg")}, data={"text": row["text"]}).json()
    model = load_model(str(checkpoints / FUSION_MODEL))
    expected = model.embed(images=[[load_image(photo)]], texts=[row["text"]])[0]
    assert answer["model"] == FUSION_MODEL and answer["dim"] == model.embedding_dim == len(answer["vector"])
    np.testing.assert_allclose(answer["vector"], expected, atol=1e-5)
    text = client.post("/embed", params={"model": TEXT_MODEL}, json={"text": row["text"]}).json()
    np.testing.assert_allclose(text["vector"], load_model(str(checkpoints / TEXT_MODEL)).embed(texts=[row["text"]])[0],
                               atol=1e-5)


def test_embed_batch_answers_each_listing_in_order(client: httpx.Client, checkpoints: Path, catalogue,
                                                  sample: dict) -> None:  # type: ignore[no-untyped-def]
    rows = catalogue.iloc[:3]
    photos = [photo_bytes(sample, row["image_ids"][0]) for _, row in rows.iterrows()]
    answer = client.post("/embed/batch", files=[("image", (f"p{i}.jpg", photo, "image/jpeg"))
                                                for i, photo in enumerate(photos)],
                         data={"text": rows["text"].tolist()}).json()
    fusion = load_model(str(checkpoints / FUSION_MODEL))
    expected = fusion.embed(images=[[load_image(photo)] for photo in photos], texts=rows["text"].tolist())
    assert answer["model"] == FUSION_MODEL and answer["dim"] == fusion.embedding_dim
    np.testing.assert_allclose(answer["vectors"], expected, atol=1e-5)
    single = client.post("/embed", files={"image": ("p.jpg", photos[1], "image/jpeg")},
                         data={"text": rows["text"].iloc[1]}).json()["vector"]
    np.testing.assert_allclose(answer["vectors"][1], single, atol=1e-5)
    texts = client.post("/embed/batch", params={"model": TEXT_MODEL}, json={"texts": rows["text"].tolist()}).json()
    np.testing.assert_allclose(texts["vectors"], load_model(str(checkpoints / TEXT_MODEL)).embed(
        texts=rows["text"].tolist()), atol=1e-5)


def test_embed_batch_refuses_unpaired_or_missing_inputs(client: httpx.Client, catalogue, sample: dict) -> None:  # type: ignore[no-untyped-def]
    photo = photo_bytes(sample, catalogue.iloc[0]["image_ids"][0])
    assert "pairs the i-th photo" in error_message(
        client.post("/embed/batch", files=[("image", ("p.jpg", photo, "image/jpeg"))], data={"text": ["a", "b"]}),
        422, "invalid_input")
    assert "texts" in error_message(client.post("/embed/batch", json={"texts": []}), 422, "invalid_request")
    assert "missing" in error_message(client.post("/embed/batch", data={"k": "3"}), 422, "invalid_input")
    assert "does not take texts" in error_message(
        client.post("/embed/batch", params={"model": IMAGE_MODEL}, json={"texts": ["sofa"]}), 422, "invalid_input")


def test_concurrent_queries_are_micro_batched_and_answered_alike(client: httpx.Client, server: LoopbackServer,
                                                                 catalogue) -> None:  # type: ignore[no-untyped-def]
    texts = catalogue["text"].tolist()[:16]
    alone = [client.post("/similar", json={"text": text, "k": 3}).json()["results"] for text in texts]

    def ask(text: str) -> list[dict]:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return http.post("/similar", json={"text": text, "k": 3}).json()["results"]

    with ThreadPoolExecutor(max_workers=16) as threads:
        together = list(threads.map(ask, texts))
    assert [[item["listing_id"] for item in r] for r in together] == [[item["listing_id"] for item in r] for r in alone]
    metrics = client.get("/metrics").text
    assert "fusion" in metrics


# ---- bad queries --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "status", "code", "says"), [
    ({}, 422, "invalid_input", "nothing to search with"),
    ({"k": 5}, 422, "invalid_input", "nothing to search with"),
    ({"listing_id": "no-such-listing"}, 404, "unknown_listing", "no-such-listing"),
    ({"listing_id": "x", "k": 0}, 422, "invalid_request", "k"),
    ({"listing_id": "x", "k": MAX_K + 1}, 422, "invalid_request", "k"),
    ({"listing_id": "x", "k": "many"}, 422, "invalid_request", "k"),
    ({"text": ""}, 422, "invalid_request", "text"),
    ({"text": "sofa", "listing_id": "x"}, 422, "invalid_input", "not both"),
    ({"text": "sofa", "min_price": 50, "max_price": 10}, 422, "invalid_input", "min_price"),
    ({"text": "sofa", "min_price": -1}, 422, "invalid_request", "min_price"),
])
def test_bad_queries_are_clear_4xx_errors(client: httpx.Client, body: dict, status: int, code: str,
                                          says: str) -> None:
    assert says in error_message(client.post("/similar", json=body), status, code)


def test_bad_forms_and_media_types(client: httpx.Client) -> None:
    assert "k" in error_message(client.post("/similar", data={"text": "sofa", "k": "-3"}), 422, "invalid_request")
    error_message(client.post("/similar", content=b"sofa", headers={"content-type": "text/plain"}), 415,
                  "unsupported_media_type")
    error_message(client.post("/similar", files={"image": ("x.jpg", b"not a photo", "image/jpeg")}), 400, "bad_image")
    assert "hog-svm" in error_message(client.post("/embed", params={"model": "hog-svm"}, json={"text": "sofa"}),
                                      422, "invalid_input")
    assert "does not take texts" in error_message(
        client.post("/embed", params={"model": IMAGE_MODEL}, json={"text": "sofa"}), 422, "invalid_input")


def test_an_index_of_another_model_revision_is_refused(checkpoints: Path, sample: dict[str, str]) -> None:
    stale = load_model(str(checkpoints / TEXT_MODEL))
    stale.source = {"name": TEXT_MODEL, "revision": "an-older-revision"}
    build_index(stale, **sample, target=str(checkpoints / "stale-index"), progress=False)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
        settings = ServingSettings(text_model=TEXT_MODEL, index="stale-index", db_url=sample["db_url"],
                                   torch_threads=1)
        with LoopbackServer(create_app(settings)) as running, httpx.Client(base_url=running.url) as http:
            running.wait_ready()
            message = error_message(http.post("/similar", json={"text": "oak table", "k": 3}), 409,
                                    "index_model_mismatch")
            assert "an-older-revision" in message and "rebuild the index" in message


# ---- pgvector -----------------------------------------------------------------------------------------------
def test_similar_on_a_pgvector_index_filters_in_sql(pgvector_url: str, checkpoints: Path,
                                                    tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_sample_marketplace(pgvector_url, images, n_products=52, seed=2, progress=False)
    catalogue = read_catalogue(open_engine(pgvector_url)).set_index("listing_id")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
        build_index(TEXT_MODEL, db_url=pgvector_url, image_location=str(images), backend="pgvector", progress=False)
        settings = ServingSettings(text_model=TEXT_MODEL, index="pgvector:listing_embeddings", db_url=pgvector_url,
                                   torch_threads=1)
        with LoopbackServer(create_app(settings)) as running, httpx.Client(base_url=running.url, timeout=60) as http:
            running.wait_ready()
            listing = catalogue.index[4]
            answer = http.post("/similar", json={"listing_id": listing, "k": 6})
            assert answer.status_code == 200, answer.text
            check_listings(answer.json()["results"], catalogue, 6, excluded=listing)
            root = catalogue.loc[listing, "category"].split(" / ")[0]
            filtered = http.post("/similar", json={"text": catalogue.loc[listing, "text"], "k": 3,
                                                   "category": root, "max_price": 500}).json()["results"]
            assert filtered and all(item["category"].startswith(root) and item["price"] <= 500 for item in filtered)
            error_message(http.post("/similar", json={"listing_id": "gone"}), 404, "unknown_listing")


def test_a_similar_model_named_apart_from_the_index_is_checked_by_revision(checkpoints: Path,
                                                                          sample: dict[str, str]) -> None:
    # Built from the checkpoint's folder, served under its bare name: the same content, so the same revision.
    build_index(load_model(str(checkpoints / TEXT_MODEL)), **sample, target=str(checkpoints / "path-index"),
                progress=False)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
        settings = ServingSettings(text_model=TEXT_MODEL, index="path-index", similar_model=TEXT_MODEL,
                                   db_url=sample["db_url"], torch_threads=1)
        with LoopbackServer(create_app(settings)) as running, httpx.Client(base_url=running.url) as http:
            running.wait_ready()
            answer = http.post("/similar", json={"text": "oak table", "k": 3})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == TEXT_MODEL and len(answer.json()["results"]) == 3


def test_similar_and_embed_want_the_servers_api_key(checkpoints: Path, sample: dict[str, str]) -> None:
    key = "a-long-enough-test-key-0123456789"
    build_index(load_model(str(checkpoints / TEXT_MODEL)), **sample, target=str(checkpoints / "path-index"),
                progress=False)  # up to date already when the test above ran: then nothing is embedded
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
        settings = ServingSettings(text_model=TEXT_MODEL, index="path-index", similar_model=TEXT_MODEL,
                                   db_url=sample["db_url"], torch_threads=1, api_keys=[key])
        with LoopbackServer(create_app(settings)) as running, httpx.Client(base_url=running.url) as http:
            running.wait_ready()
            for path, body in (("/similar", {"text": "oak table"}), ("/embed", {"text": "oak table"}),
                               ("/embed/batch", {"texts": ["oak table"]})):
                error_message(http.post(path, json=body), 401, "unauthorized")
                assert http.post(path, json=body, headers={"X-API-Key": key}).status_code == 200
