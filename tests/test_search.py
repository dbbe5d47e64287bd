"""The ListingIndex interface, the same for every backend: FAISS exact and HNSW in process, pgvector exact and HNSW
on a real PostgreSQL 16 with the vector extension."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest

from marketplace_reco.search import (
    MAX_K,
    DuplicateListingError,
    EmbeddingSpec,
    FaissListingIndex,
    IndexInputError,
    ListingIndex,
    ModelMismatchError,
    SearchFilters,
    UnknownListingError,
)
from marketplace_reco.search.pgvector_index import PgvectorListingIndex

if TYPE_CHECKING:
    from conftest import ListingVectors

SPEC = EmbeddingSpec(model_name="image-classifier", model_revision="abc123", model_type="image-classifier",
                     encodes="image", dim=16)
BACKENDS = ("faiss-exact", "faiss-hnsw", "pgvector-exact", "pgvector-hnsw")
EXACT_BACKENDS = ("faiss-exact", "pgvector-exact")


@pytest.fixture(params=BACKENDS)
def new_index(request: pytest.FixtureRequest) -> Callable[[], ListingIndex]:
    """A factory of empty indexes of one backend and kind (pgvector: one table in a database of the test)."""
    backend, kind = request.param.split("-")
    if backend == "faiss":
        return lambda: FaissListingIndex(SPEC, kind=kind)
    engine = request.getfixturevalue("pgvector_engine")
    return lambda: PgvectorListingIndex.create(engine, SPEC, kind=kind)


@pytest.fixture
def index(new_index: Callable[[], ListingIndex], listing_vectors: ListingVectors) -> ListingIndex:
    """An index holding the first 200 of the synthetic listings."""
    built = new_index()
    built.add(listing_vectors.ids[:200], listing_vectors.vectors[:200])
    return built


def brute_force(listings: ListingVectors, rows: list[int], query: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The exact top ``k`` of ``query`` among ``rows`` by inner product."""
    scores = listings.vectors[rows] @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [(listings.ids[rows[i]], float(scores[i])) for i in order]


def is_exact(request: pytest.FixtureRequest) -> bool:
    return request.node.callspec.params["new_index"] in EXACT_BACKENDS


def test_results_match_brute_force(index: ListingIndex, listing_vectors: ListingVectors,
                                   request: pytest.FixtureRequest) -> None:
    queries = listing_vectors.vectors[200:230]  # listings not in the index, as a new listing's query would be
    results = index.search(queries, 10)
    assert len(index) == 200 and all(len(found) == 10 for found in results)
    recalls = []
    for query, found in zip(queries, results):
        expected = brute_force(listing_vectors, list(range(200)), query, 10)
        scores = [neighbour.score for neighbour in found]
        assert scores == sorted(scores, reverse=True)
        if is_exact(request):
            assert [n.listing_id for n in found] == [listing_id for listing_id, _ in expected]
            np.testing.assert_allclose(scores, [score for _, score in expected], atol=1e-5)
        recalls.append(len({n.listing_id for n in found} & {listing_id for listing_id, _ in expected}) / 10)
    assert np.mean(recalls) >= 0.95


def test_the_query_listing_is_excluded_and_each_listing_comes_once(index: ListingIndex,
                                                                   listing_vectors: ListingVectors) -> None:
    queries = listing_vectors.vectors[:3]
    own = [[listing_id] for listing_id in listing_vectors.ids[:3]]
    unexcluded = index.search(queries, 5)
    assert [found[0].listing_id for found in unexcluded] == listing_vectors.ids[:3]  # its own vector is nearest
    for position, found in enumerate(index.search(queries, 5, exclude_ids=own)):
        ids = [n.listing_id for n in found]
        assert len(ids) == 5 == len(set(ids)) and listing_vectors.ids[position] not in ids
        assert ids[:4] == [n.listing_id for n in unexcluded[position][1:5]]


def test_add_upsert_and_delete_change_the_answers(index: ListingIndex, listing_vectors: ListingVectors) -> None:
    newcomer, query = listing_vectors.ids[210], listing_vectors.vectors[210]
    assert newcomer not in index
    index.add([newcomer], query[None, :])
    assert newcomer in index and len(index) == 201
    assert index.search(query[None, :], 1)[0][0].listing_id == newcomer

    # Give an indexed listing the query's vector: it becomes the best match, with a cosine of 1.
    moved = listing_vectors.ids[5]
    index.upsert([moved, listing_vectors.ids[211]], np.stack([query, listing_vectors.vectors[211]]))
    assert len(index) == 202
    top = index.search(query[None, :], 2)[0]
    assert {n.listing_id for n in top} == {newcomer, moved} and top[1].score == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(index.get_vectors([moved]), query[None, :], atol=1e-6)

    index.delete([newcomer, moved])
    assert len(index) == 200 and newcomer not in index and moved not in index
    found = index.search(query[None, :], 10)[0]
    assert len(found) == 10 and not {newcomer, moved} & {n.listing_id for n in found}


def test_the_allow_list_restricts_the_results(index: ListingIndex, listing_vectors: ListingVectors) -> None:
    allowed = listing_vectors.ids[100:130] + ["listing-not-indexed"]
    query = listing_vectors.vectors[0]
    found = index.search(query[None, :], 10, filters=SearchFilters(allowed_ids=frozenset(allowed)))[0]
    assert [n.listing_id for n in found] == [i for i, _ in brute_force(listing_vectors, list(range(100, 130)),
                                                                          query, 10)]
    few = index.search(query[None, :], 10, filters=SearchFilters(allowed_ids=frozenset(allowed[:3])))[0]
    assert sorted(n.listing_id for n in few) == allowed[:3]  # fewer than k qualify: all of them, no padding


def test_get_vectors_returns_the_stored_vectors_in_order(index: ListingIndex,
                                                         listing_vectors: ListingVectors) -> None:
    ids = [listing_vectors.ids[7], listing_vectors.ids[3]]
    np.testing.assert_allclose(index.get_vectors(ids), listing_vectors.vectors[[7, 3]], atol=1e-6)
    with pytest.raises(UnknownListingError, match="listing-999"):
        index.get_vectors(["listing-999"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k": 0}, "k must be an integer from 1 to 1000, got 0"),
    ({"k": -3}, "k must be an integer"),
    ({"k": MAX_K + 1}, f"from 1 to {MAX_K}, got {MAX_K + 1}"),
    ({"k": 2.5}, "k must be an integer"),
    ({"k": True}, "k must be an integer"),
    ({"query_vectors": np.ones((1, 8), np.float32) / np.sqrt(8)},
     r"shape \[n, 16\] \(the index's dimension\), got \[1, 8\]"),
    ({"query_vectors": np.ones(16, np.float32) / 4}, r"shape \[n, 16\].*got \[16\]"),
    ({"query_vectors": np.zeros((0, 16), np.float32)}, "query_vectors is empty"),
    ({"query_vectors": np.full((2, 16), np.nan, np.float32)}, "rows 0, 1 hold NaN"),
    ({"query_vectors": np.ones((1, 16), np.float32)}, "rows 0 are not L2-normalised .*norm 4"),
    ({"query_vectors": [["a"] * 16]}, "must be a \\[n, 16\\] array of numbers"),
    ({"exclude_ids": [["listing-000"], ["listing-001"]]}, "one collection of listing ids per query \\(1\\)"),
    ({"exclude_ids": ["listing-000"]}, "not the string 'listing-000' \\(write \\['listing-000'\\]\\)"),
])
def test_bad_queries_get_clear_errors(index: ListingIndex, listing_vectors: ListingVectors, kwargs: dict,
                                      message: str) -> None:
    call = {"query_vectors": listing_vectors.vectors[:1], "k": 5, **kwargs}
    with pytest.raises(IndexInputError, match=message):
        index.search(call.pop("query_vectors"), call.pop("k"), **call)


def test_bad_updates_are_refused_and_change_nothing(index: ListingIndex, listing_vectors: ListingVectors) -> None:
    vectors = listing_vectors.vectors
    before = index.search(vectors[:2], 10)
    with pytest.raises(DuplicateListingError, match="1 listing id\\(s\\) appear more than once in ids: 'listing-210'"):
        index.add(["listing-210", "listing-210"], vectors[210:212])
    already = r"1 listing id\(s\) are in the index already \(upsert replaces their vectors\): 'listing-000'"
    with pytest.raises(DuplicateListingError, match=already):
        index.add(["listing-211", "listing-000"], vectors[[211, 0]])
    with pytest.raises(UnknownListingError, match="2 listing id\\(s\\) not in .*'listing-220', 'listing-221'"):
        index.delete(["listing-001", "listing-220", "listing-221"])
    with pytest.raises(IndexInputError, match="vectors has 1 rows for 2 listing ids"):
        index.upsert(["listing-001", "listing-212"], vectors[:1])
    with pytest.raises(IndexInputError, match=r"ids\[0\] must be a non-empty string of at most 64"):
        index.add(["x" * 65], vectors[:1])
    with pytest.raises(IndexInputError, match="ids must be a sequence of listing ids, got str"):
        index.delete("listing-001")
    with pytest.raises(IndexInputError, match="rows 1 are not L2-normalised"):
        index.upsert(["listing-001", "listing-213"], np.stack([vectors[1], 2 * vectors[2]]))
    assert len(index) == 200 and "listing-211" not in index and "listing-001" in index
    assert index.search(vectors[:2], 10) == before


def test_check_model_names_both_revisions(index: ListingIndex) -> None:
    index.check_model("image-classifier", "abc123")
    with pytest.raises(ModelMismatchError, match="revision 'abc123', not of 'image-classifier' revision 'def456'"):
        index.check_model("image-classifier", "def456")
    with pytest.raises(ModelMismatchError, match="not of 'fusion'"):
        index.check_model("fusion", "abc123")


def test_an_empty_index_answers_with_no_neighbours(new_index: Callable[[], ListingIndex],
                                                   listing_vectors: ListingVectors) -> None:
    empty = new_index()
    assert len(empty) == 0 and empty.search(listing_vectors.vectors[:2], 5) == [[], []]
