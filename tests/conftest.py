"""Shared fixtures: real PostgreSQL, real S3 (moto server), the shared real data, the sample marketplace.

Services are started once per test session, on demand (only when a test asks for the fixture),
and stopped at the end of the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from marketplace_reco.data.dataset import Marketplace, load_marketplace
from marketplace_reco.data.sample import make_sample_marketplace
from services import MotoS3Server, PostgresServer, find_postgres_bin_dir

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
