"""The FAISS backend: exact and HNSW structures, tombstones and compaction, and the saved index (checkpoint-style
folder, checksums, local folders, the checkpoints folder by name and S3 through the moto server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from safetensors import safe_open

from marketplace_reco.models.errors import CheckpointNotFoundError
from marketplace_reco.search import (
    EmbeddingSpec,
    FaissListingIndex,
    IndexConfigError,
    IndexFileError,
    IndexInputError,
    SearchFilters,
)

if TYPE_CHECKING:
    from conftest import ListingVectors

SPEC = EmbeddingSpec(model_name="fusion", model_revision="r1", model_type="fusion", encodes="image+text", dim=16)


def clustered_unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    vectors = (centres[rng.integers(0, 20, n)] + 0.7 * rng.standard_normal((n, dim))).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def answers(index: FaissListingIndex, queries: np.ndarray, k: int = 10) -> list[list[str]]:
    return [[n.listing_id for n in found] for found in index.search(queries, k)]


def test_hnsw_recall_against_exact_search() -> None:
    spec = EmbeddingSpec(model_name="m", model_revision="r", model_type="t", encodes="image", dim=32)
    vectors, queries = clustered_unit_vectors(3000, 32, seed=1), clustered_unit_vectors(100, 32, seed=2)
    ids = [f"p{number}" for number in range(3000)]
    exact, hnsw = FaissListingIndex(spec, kind="exact"), FaissListingIndex(spec, kind="hnsw", ef_search=16)
    exact.add(ids, vectors)
    hnsw.add(ids, vectors)
    assert exact.structure == "exact" and hnsw.structure == "hnsw"
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(answers(hnsw, queries), answers(exact, queries))])
    assert recall >= 0.9


def test_auto_switches_to_hnsw_past_the_exact_budget(listing_vectors: ListingVectors) -> None:
    index = FaissListingIndex(SPEC, exact_max_components=100 * SPEC.dim)  # exact up to 100 listings
    index.add(listing_vectors.ids[:100], listing_vectors.vectors[:100])
    assert index.structure == "exact"
    index.add(listing_vectors.ids[100:101], listing_vectors.vectors[100:101])
    assert index.structure == "hnsw" and len(index) == 101
    assert answers(index, listing_vectors.vectors[:3], 1) == [[i] for i in listing_vectors.ids[:3]]


def test_hnsw_deletes_are_tombstones_until_compact(listing_vectors: ListingVectors) -> None:
    index = FaissListingIndex(SPEC, kind="hnsw")
    index.add(listing_vectors.ids, listing_vectors.vectors)
    index.delete(listing_vectors.ids[:100])
    index.upsert(listing_vectors.ids[100:110], listing_vectors.vectors[110:120])
    assert (len(index), index.rows, index.deleted_rows) == (140, 250, 110)
    before = answers(index, listing_vectors.vectors[:20])
    assert not set(listing_vectors.ids[:100]) & {i for found in before for i in found}
    index.compact()
    assert (len(index), index.rows, index.deleted_rows, index.structure) == (140, 140, 0, "hnsw")
    assert answers(index, listing_vectors.vectors[:20]) == before


def test_the_exact_structure_compacts_itself(listing_vectors: ListingVectors) -> None:
    index = FaissListingIndex(SPEC, kind="exact")
    index.add(listing_vectors.ids, listing_vectors.vectors)
    index.delete(listing_vectors.ids[:60])  # exactly a quarter: kept as tombstones
    assert (index.rows, index.deleted_rows) == (240, 60)
    index.delete(listing_vectors.ids[60:61])
    assert (index.rows, index.deleted_rows, len(index)) == (179, 0, 179)


def test_a_large_allow_list_under_hnsw_still_returns_k_allowed_listings(listing_vectors: ListingVectors) -> None:
    # A tiny exact budget and efSearch force HNSW with the allow-list as a selector (and its exact fallback).
    index = FaissListingIndex(SPEC, kind="hnsw", ef_search=1, exact_max_components=SPEC.dim)
    index.add(listing_vectors.ids, listing_vectors.vectors)
    allowed = frozenset(listing_vectors.ids[1::8])  # one cluster of eight: far from most queries
    query = listing_vectors.vectors[:1]
    found = index.search(query, 20, filters=SearchFilters(allowed_ids=allowed))[0]
    scores = listing_vectors.vectors[1::8] @ query[0]
    assert [n.listing_id for n in found] == [listing_vectors.ids[1::8][i] for i in np.argsort(-scores)[:20]]


def test_database_filters_are_refused_with_the_way_out(listing_vectors: ListingVectors) -> None:
    index = FaissListingIndex(SPEC)
    index.add(listing_vectors.ids[:10], listing_vectors.vectors[:10])
    with pytest.raises(IndexInputError, match="cannot filter by category, max_price: resolve them to "
                                              "SearchFilters.allowed_ids .* or use the pgvector backend"):
        index.search(listing_vectors.vectors[:1], 3, filters=SearchFilters(category="Home & Garden", max_price=10))


@pytest.mark.parametrize("settings", [{"kind": "flat"}, {"hnsw_m": 0}, {"ef_search": "64"}])
def test_bad_settings_are_refused(settings: dict) -> None:
    with pytest.raises(IndexConfigError, match=str(next(iter(settings)))):
        FaissListingIndex(SPEC, **settings)


# ---- saving and loading ------------------------------------------------------------------------------------------
@pytest.fixture(params=["exact", "hnsw"])
def built(request: pytest.FixtureRequest, listing_vectors: ListingVectors) -> FaissListingIndex:
    """An index with deletions and an upsert behind it."""
    index = FaissListingIndex(SPEC, kind=request.param, ef_search=40)
    index.add(listing_vectors.ids[:200], listing_vectors.vectors[:200])
    index.delete(listing_vectors.ids[:5])
    index.upsert(["listing-010", "listing-ü-201"], listing_vectors.vectors[[201, 202]])
    return index


def test_save_and_load_round_trip(built: FaissListingIndex, listing_vectors: ListingVectors, tmp_path: Path) -> None:
    folder = built.save_pretrained(tmp_path / "listings")
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "listing-index" and config["format_version"] == 1
    assert config["embedding_model"] == {"name": "fusion", "revision": "r1", "model_type": "fusion"}
    assert (config["encodes"], config["dim"], config["metric"]) == ("image+text", 16, "inner_product")
    assert config["listings"] == 196 and config["settings"]["ef_search"] == 40
    card = (folder / "README.md").read_text()
    assert "196 listings, image+text vectors of fusion" in card and f"structure | {built.structure}" in card

    loaded = FaissListingIndex.from_pretrained(folder)
    assert (len(loaded), loaded.rows, loaded.structure) == (len(built), built.rows, built.structure)
    assert loaded.source["folder"] == str(folder) and loaded.source["revision"]
    queries = listing_vectors.vectors[200:240]
    assert loaded.search(queries, 10) == built.search(queries, 10)
    assert "listing-ü-201" in loaded and "listing-000" not in loaded
    loaded.check_model("fusion", "r1")
    # The loaded index goes on taking updates.
    loaded.add(["listing-230"], listing_vectors.vectors[230:231])
    assert answers(loaded, listing_vectors.vectors[230:231], 1) == [["listing-230"]]


def test_a_corrupted_vector_file_is_refused(built: FaissListingIndex, tmp_path: Path) -> None:
    folder = built.save_pretrained(tmp_path / "listings")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF  # a byte in the last array's data, past the header
    weights.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="does not match its sha256; the file is corrupted"):
        FaissListingIndex.from_pretrained(folder)


def test_a_config_that_disagrees_with_the_arrays_is_refused(built: FaissListingIndex, tmp_path: Path) -> None:
    folder = built.save_pretrained(tmp_path / "listings")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rows": config["rows"] + 1}))
    with pytest.raises(IndexFileError, match=r"array 'vectors' is float32 \[\d+, 16\], the config expects float32"):
        FaissListingIndex.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "hog-svm"}))
    with pytest.raises(IndexFileError, match="model_type 'hog-svm' backend 'faiss' is not a FAISS listing index"):
        FaissListingIndex.from_pretrained(folder)


def test_the_saved_arrays_are_plain_safetensors(built: FaissListingIndex, tmp_path: Path) -> None:
    folder = built.save_pretrained(tmp_path / "listings")
    with safe_open(str(folder / "model.safetensors"), framework="np") as handle:
        keys = set(handle.keys())
        offsets, raw = handle.get_tensor("id_offsets"), handle.get_tensor("id_bytes").tobytes()
    assert keys == {"vectors", "deleted", "id_bytes", "id_offsets"} | ({"hnsw_graph"} if built.structure == "hnsw"
                                                                         else set())
    assert raw[offsets[-2]:offsets[-1]].decode() == "listing-ü-201"


def test_push_and_pull_through_a_folder_the_checkpoints_folder_and_s3(
        built: FaissListingIndex, listing_vectors: ListingVectors, tmp_path: Path, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    queries = listing_vectors.vectors[200:210]
    expected = built.search(queries, 5)

    built.push_to_hub(str(tmp_path / "exports" / "listings"))
    assert FaissListingIndex.from_pretrained(str(tmp_path / "exports" / "listings")).search(queries, 5) == expected

    monkeypatch.setenv("MARKETPLACE_CHECKPOINTS", str(tmp_path / "checkpoints"))
    built.push_to_hub("listing-index", revision="v2")
    assert (tmp_path / "checkpoints" / "listing-index@v2" / "config.json").is_file()
    assert FaissListingIndex.from_pretrained("listing-index", revision="v2").search(queries, 5) == expected

    monkeypatch.setenv("MARKETPLACE_CACHE", str(tmp_path / "cache"))
    target = f"s3://{s3_bucket}/indexes/listing-index"
    assert built.push_to_hub(target, revision="2026-12") == "2026-12"
    pulled = FaissListingIndex.from_pretrained(target, revision="2026-12")
    assert pulled.search(queries, 5) == expected
    assert pulled.source == {"name": target, "revision": "2026-12", "folder": str(pulled.source["folder"])}
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at"):
        FaissListingIndex.from_pretrained(target, revision="missing")
