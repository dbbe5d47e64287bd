"""Shared fixtures: real PostgreSQL, real S3 (moto server), the shared real data, the sample marketplace.

Services are started once per test session, on demand (only when a test asks for the fixture),
and stopped at the end of the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import pytest
from sqlalchemy import Engine, insert

from marketplace_reco.data.database import open_engine
from marketplace_reco.data.dataset import Marketplace, load_marketplace
from marketplace_reco.data.sample import make_sample_marketplace
from marketplace_reco.data.schema import create_schema, products
from search_models import save_embedding_checkpoints
from services import MotoS3Server, PgvectorServer, PostgresServer, find_pgvector_bin_dir, find_postgres_bin_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MARKETPLACE = REPO_ROOT.parent / "shared" / "marketplace"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster for the session; skipped only when no server binary exists."""
    bin_dir = find_postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql/*/bin; "
            "run scripts/install_services.sh"
        )
    with PostgresServer(bin_dir=bin_dir) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL of a database shared by the whole session (tests must not rely on it being empty)."""
    return postgres_server.create_database("marketplace_session")


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL of a new, empty database for one test."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def pgvector_server() -> Iterator[PgvectorServer]:
    """A private PostgreSQL 16 cluster with the pgvector extension; skipped only when pgserver is not installed."""
    bin_dir = find_pgvector_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries with pgvector: the dev dependency pgserver is not installed "
                    "(make install, or pip install -c requirements/constraints.txt -e '.[dev]')")
    with PgvectorServer(bin_dir=bin_dir) as server:
        yield server


@pytest.fixture
def pgvector_url(pgvector_server: PgvectorServer) -> str:
    """SQLAlchemy URL of a new database for one test, with the ``vector`` extension enabled."""
    return pgvector_server.create_database(f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server; boto3 is pointed at it for the session through the standard AWS variables."""
    with MotoS3Server() as server, pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        # A service-specific endpoint would win over AWS_ENDPOINT_URL; so would a named profile.
        env.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield server.endpoint_url


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """The name of a new, empty bucket on the session's S3 endpoint."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def shared_marketplace() -> Path:
    """The real data export in ``../shared/marketplace`` (products.csv, images.csv, images/)."""
    if not (SHARED_MARKETPLACE / "products.csv").exists():
        pytest.skip(f"the shared real data is not available at {SHARED_MARKETPLACE}")
    return SHARED_MARKETPLACE


#: Products in the test sample: 10 per class keeps generation around a second.
SAMPLE_PRODUCTS = 130


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A small sample marketplace (130 products, seed 0) in a temporary SQLite file and photo folder.

    The dict holds ``db_url`` and ``image_location``, so ``load_marketplace(**sample_data)`` opens it.
    Treat it as read-only: it is shared by the whole session.
    """
    folder = tmp_path_factory.mktemp("sample")
    locations = {"db_url": f"sqlite:///{folder / 'marketplace.db'}", "image_location": str(folder / "images")}
    make_sample_marketplace(locations["db_url"], locations["image_location"], n_products=SAMPLE_PRODUCTS, seed=0,
                            progress=False)
    return locations


@pytest.fixture(scope="session")
def sample_marketplace(sample_data: dict[str, str]) -> Marketplace:
    """The session's sample marketplace, loaded (``load_marketplace``)."""
    return load_marketplace(**sample_data)


@dataclass(frozen=True)
class ListingVectors:
    """Tiny synthetic listings for the search tests: clustered unit vectors and the product fields filters use."""

    ids: list[str]
    vectors: np.ndarray
    categories: list[str]
    prices: list[float]
    locations: list[str]


#: Category paths of the synthetic listings, one per vector cluster.
SEARCH_CATEGORIES = (
    "Home & Garden / Dining, Living Room Furniture / Sofas",
    "Home & Garden / Dining, Living Room Furniture / Mirrors",
    "Home & Garden / Garden & Patio",
    "Home & Gardening Books",
    "Sports, Leisure & Travel / Bicycles",
    "Sports, Leisure & Travel / Camping",
    "Computers & Software / Laptops",
    "Computers & Software / Monitors",
)
SEARCH_LOCATIONS = ("Leeds, West Yorkshire", "Inverness, Highland", "Radstock, Somerset")


@pytest.fixture(scope="session")
def listing_vectors() -> ListingVectors:
    """240 listings, dimension 16, in 8 clusters (one category each); prices 1.0 to 240.0 pounds."""
    rng = np.random.default_rng(7)
    n, dim = 240, 16
    centres = rng.standard_normal((len(SEARCH_CATEGORIES), dim))
    cluster = np.arange(n) % len(SEARCH_CATEGORIES)
    vectors = (centres[cluster] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return ListingVectors(
        ids=[f"listing-{number:03d}" for number in range(n)],
        vectors=vectors,
        categories=[SEARCH_CATEGORIES[c] for c in cluster],
        prices=[float(number + 1) for number in range(n)],
        locations=[SEARCH_LOCATIONS[number % len(SEARCH_LOCATIONS)] for number in range(n)],
    )


@pytest.fixture
def pgvector_engine(pgvector_url: str, listing_vectors: ListingVectors) -> Iterator[Engine]:
    """An engine on a new pgvector database whose products table holds the ``listing_vectors`` listings."""
    engine = open_engine(pgvector_url)
    create_schema(engine)
    rows = [{"id": listing_id, "product_name": f"Product {listing_id}", "category": category, "price": price,
             "location": location}
            for listing_id, category, price, location in zip(listing_vectors.ids, listing_vectors.categories,
                                                             listing_vectors.prices, listing_vectors.locations)]
    with engine.begin() as conn:
        conn.execute(insert(products), rows)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def embedding_checkpoints(sample_marketplace: Marketplace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoints folder with tiny ``image-classifier``, ``text-cnn`` (trained) and ``fusion`` models made from
    the sample marketplace (``search_models.py``), for the similar-listing tests."""
    return save_embedding_checkpoints(sample_marketplace, tmp_path_factory.mktemp("embedding-checkpoints"))
