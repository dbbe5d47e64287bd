"""The pgvector backend on a real PostgreSQL 16 with the vector extension: filters joined against real products
rows, the metadata table, the HNSW build after a bulk load, and the database's own guarantees."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine, delete, select, text

from marketplace_reco.data.database import open_engine
from marketplace_reco.data.schema import products
from marketplace_reco.search import (
    EmbeddingSpec,
    IndexConfigError,
    ModelMismatchError,
    SearchFilters,
    UnknownListingError,
)
from marketplace_reco.search.build import finish_update, plan_update
from marketplace_reco.search.pgvector_index import MAX_HNSW_DIM, PgvectorListingIndex, listing_indexes

if TYPE_CHECKING:
    from conftest import ListingVectors

SPEC = EmbeddingSpec(model_name="text-cnn", model_revision="r7", model_type="text-cnn", encodes="text", dim=16)


@pytest.fixture
def index(pgvector_engine: Engine, listing_vectors: ListingVectors) -> PgvectorListingIndex:
    built = PgvectorListingIndex.create(pgvector_engine, SPEC)
    built.add(listing_vectors.ids, listing_vectors.vectors)
    return built


def expected_ids(listings: ListingVectors, query: np.ndarray, k: int, keep: list[bool]) -> list[str]:
    """Brute force over the listings that ``keep`` marks."""
    rows = [row for row, kept in enumerate(keep) if kept]
    scores = listings.vectors[rows] @ query
    return [listings.ids[rows[i]] for i in np.argsort(-scores)[:k]]


@pytest.mark.parametrize(("filters", "keep"), [
    (SearchFilters(category="Home & Garden"), lambda c, p, loc: c.startswith("Home & Garden /")),
    (SearchFilters(category="Home & Garden / Dining, Living Room Furniture"),
     lambda c, p, loc: c.startswith("Home & Garden / Dining, Living Room Furniture /")),
    (SearchFilters(category="Computers & Software / Laptops"), lambda c, p, loc: c == "Computers & Software / Laptops"),
    (SearchFilters(min_price=50, max_price=120.5), lambda c, p, loc: 50 <= p <= 120.5),
    (SearchFilters(max_price=30), lambda c, p, loc: p <= 30),
    (SearchFilters(location="highLAND"), lambda c, p, loc: "Highland" in loc),
    (SearchFilters(category="Sports, Leisure & Travel", min_price=100, location="leeds"),
     lambda c, p, loc: c.startswith("Sports") and p >= 100 and "Leeds" in loc),
])
def test_filters_select_the_matching_products(index: PgvectorListingIndex, listing_vectors: ListingVectors,
                                              filters: SearchFilters, keep) -> None:
    mask = [keep(c, p, loc) for c, p, loc in zip(listing_vectors.categories, listing_vectors.prices,
                                                 listing_vectors.locations)]
    for row in (0, 1, 13):
        query = listing_vectors.vectors[row]
        found = index.search(query[None, :], 8, filters=filters, exclude_ids=[[listing_vectors.ids[row]]])[0]
        keep_row = [kept and i != row for i, kept in enumerate(mask)]
        assert [n.listing_id for n in found] == expected_ids(listing_vectors, query, 8, keep_row)


def test_a_category_prefix_matches_whole_path_segments_only(index: PgvectorListingIndex,
                                                            listing_vectors: ListingVectors) -> None:
    # "Home & Garden" must not match "Home & Gardening Books"; "%" and "_" are not wildcards.
    found = index.search(listing_vectors.vectors[3:4], 50, filters=SearchFilters(category="Home & Garden"))[0]
    categories = {listing_vectors.categories[listing_vectors.ids.index(n.listing_id)] for n in found}
    assert len(found) == 50 and "Home & Gardening Books" not in categories
    assert index.search(listing_vectors.vectors[3:4], 5, filters=SearchFilters(category="Home % Garden")) == [[]]


def test_a_filter_that_starves_the_hnsw_scan_falls_back_to_exact(index: PgvectorListingIndex,
                                                                 listing_vectors: ListingVectors) -> None:
    index.ef_search = 1  # the HNSW scan yields ~k candidates, almost none of them in the wanted category
    query = listing_vectors.vectors[0]  # a sofa; ask for laptops
    found = index.search(query[None, :], 12, filters=SearchFilters(category="Computers & Software / Laptops"))[0]
    keep = [c == "Computers & Software / Laptops" for c in listing_vectors.categories]
    assert [n.listing_id for n in found] == expected_ids(listing_vectors, query, 12, keep)


def test_the_index_knows_its_model_after_reopening(index: PgvectorListingIndex, pgvector_engine: Engine) -> None:
    reopened = PgvectorListingIndex.open(pgvector_engine)
    assert (reopened.embedding, reopened.kind, reopened.ef_search) == (SPEC, "hnsw", index.ef_search)
    assert len(reopened) == 240
    reopened.check_model("text-cnn", "r7")
    with pytest.raises(ModelMismatchError, match="'text-cnn' revision 'r7', not of 'text-cnn' revision 'r8'"):
        reopened.check_model("text-cnn", "r8")


def test_create_refuses_an_existing_index_unless_replacing(index: PgvectorListingIndex,
                                                           pgvector_engine: Engine) -> None:
    newer = EmbeddingSpec(model_name="text-cnn", model_revision="r8", model_type="text-cnn", encodes="text", dim=32)
    with pytest.raises(IndexConfigError, match="exists already \\(model 'text-cnn' revision 'r7'\\): open it, or"):
        PgvectorListingIndex.create(pgvector_engine, newer)
    assert len(PgvectorListingIndex.open(pgvector_engine)) == 240
    replaced = PgvectorListingIndex.create(pgvector_engine, newer, replace=True)
    assert len(replaced) == 0 and PgvectorListingIndex.open(pgvector_engine).embedding == newer
    other = PgvectorListingIndex.create(pgvector_engine, SPEC, name="text_embeddings_r7", kind="exact")
    assert PgvectorListingIndex.open(pgvector_engine, "text_embeddings_r7").kind == "exact"
    other.drop()
    with pytest.raises(IndexConfigError, match="no listing index 'text_embeddings_r7' in database .*: create it"):
        PgvectorListingIndex.open(pgvector_engine, "text_embeddings_r7")


def test_bulk_load_then_build_hnsw(pgvector_engine: Engine, listing_vectors: ListingVectors) -> None:
    index = PgvectorListingIndex.create(pgvector_engine, SPEC, kind="exact")
    index.add(listing_vectors.ids, listing_vectors.vectors)
    exact = index.search(listing_vectors.vectors[:20], 10)
    index.build_hnsw(maintenance_work_mem="64MB", parallel_workers=0)
    assert index.kind == PgvectorListingIndex.open(pgvector_engine).kind == "hnsw"
    with pgvector_engine.connect() as conn:
        definition = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'listing_embeddings_hnsw'"))
        assert "USING hnsw (embedding vector_ip_ops) WITH (m='16', ef_construction='64')" in definition.scalar_one()
    assert index.search(listing_vectors.vectors[:20], 10) == exact  # 240 vectors: HNSW finds them all
    with pytest.raises(IndexConfigError, match="maintenance_work_mem must look like 512MB or 2GB, got '1 TB;'"):
        index.build_hnsw(maintenance_work_mem="1 TB;")


def test_vectors_too_wide_for_hnsw_stay_exact_after_a_first_load(pgvector_engine: Engine,
                                                                  listing_vectors: ListingVectors,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    # ResNet-50's pooled output is 2048 wide: the first load must keep its vectors, not fail at the HNSW build.
    wide = EmbeddingSpec(model_name="image-classifier", model_revision="r1", model_type="image-classifier",
                         encodes="image", dim=MAX_HNSW_DIM + 1)
    index = PgvectorListingIndex.create(pgvector_engine, wide, name="wide_embeddings", kind="exact")
    vectors = np.random.default_rng(0).normal(size=(5, wide.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.add(listing_vectors.ids[:5], vectors)
    plan = plan_update([], pd.DataFrame({"listing_id": listing_vectors.ids[:5], "image_ids": [["photo"]] * 5,
                                         "text": ["a listing"] * 5}), "image")
    with caplog.at_level("WARNING"):
        finish_update(index, plan, listing_vectors.ids[:5], build_hnsw=True)
    assert index.kind == "exact" and "stays exact" in caplog.text and str(MAX_HNSW_DIM) in caplog.text
    assert [n.listing_id for n in index.search(vectors[:1], 1)[0]] == listing_vectors.ids[:1]
    with pytest.raises(IndexConfigError, match=f"at most {MAX_HNSW_DIM} dimensions"):
        index.build_hnsw()
    index.drop()


def test_only_listings_of_the_products_table_can_be_added(pgvector_engine: Engine,
                                                          listing_vectors: ListingVectors) -> None:
    index = PgvectorListingIndex.create(pgvector_engine, SPEC)
    with pytest.raises(UnknownListingError, match="1 listing id\\(s\\) not in the products table of database "
                                                  ".*: 'no-such-product'"):
        index.upsert(["listing-000", "no-such-product"], listing_vectors.vectors[:2])
    assert len(index) == 0


def test_deleting_a_product_deletes_its_vector(index: PgvectorListingIndex, pgvector_engine: Engine) -> None:
    with pgvector_engine.begin() as conn:
        conn.execute(delete(products).where(products.c.id == "listing-004"))
    assert "listing-004" not in index and len(index) == 239


def test_the_metadata_row_records_the_model(index: PgvectorListingIndex, pgvector_engine: Engine) -> None:
    with pgvector_engine.connect() as conn:
        row = conn.execute(select(listing_indexes)).mappings().one()
    assert dict(row) == {"name": "listing_embeddings", "model_name": "text-cnn", "model_revision": "r7",
                         "model_type": "text-cnn", "encodes": "text", "dim": 16, "metric": "inner_product",
                         "kind": "hnsw", "hnsw_m": 16, "ef_construction": 64, "ef_search": 100}


@pytest.mark.parametrize(("settings", "message"), [
    ({"name": "Listing-Embeddings"}, "index name must be a lower-case SQL identifier"),
    ({"name": "x; DROP TABLE products"}, "index name must be a lower-case SQL identifier"),
    ({"kind": "ivf"}, "kind must be one of \\('exact', 'hnsw'\\)"),
    ({"ef_search": 5000}, "ef_search must be an integer from 1 to 1000"),
    ({"hnsw_m": 32, "ef_construction": 40}, "ef_construction \\(40\\) must be at least twice hnsw_m \\(32\\)"),
])
def test_bad_settings_are_refused(pgvector_engine: Engine, settings: dict, message: str) -> None:
    with pytest.raises(IndexConfigError, match=message):
        PgvectorListingIndex.create(pgvector_engine, SPEC, **settings)


def test_a_database_other_than_postgresql_is_refused(sample_data: dict[str, str]) -> None:
    engine = open_engine(sample_data["db_url"])
    with pytest.raises(IndexConfigError, match="needs PostgreSQL through psycopg2; database sqlite:///.* is sqlite"):
        PgvectorListingIndex.open(engine)
    engine.dispose()


def test_a_server_without_pgvector_gets_a_clear_error(fresh_postgres_url: str) -> None:
    engine = open_engine(fresh_postgres_url)  # Debian's PostgreSQL 15, which has no vector extension
    with pytest.raises(IndexConfigError, match="cannot enable the pgvector extension .*install pgvector on the server"):
        PgvectorListingIndex.create(engine, SPEC)
    engine.dispose()
