"""Default locations of the project's data, each overridable by an environment variable.

Relative defaults are resolved against the current working directory (not the package folder), so
an installed package works from any project folder: run the scripts from the repository root, or
set the variables below.

| function                   | environment variable       | default                           |
| -------------------------- | -------------------------- | --------------------------------- |
| ``default_db_url()``       | ``MARKETPLACE_DB_URL``     | ``sqlite:///<cwd>/data/marketplace.db`` |
| ``default_image_location()`` | ``MARKETPLACE_IMAGES``   | ``<cwd>/data/images`` (or ``s3://bucket/prefix``) |
| ``checkpoints_dir()``      | ``MARKETPLACE_CHECKPOINTS`` | ``<cwd>/checkpoints``            |
| ``reports_dir()``          | ``MARKETPLACE_REPORTS``    | ``<cwd>/reports``                 |
| ``cache_dir()``            | ``MARKETPLACE_CACHE``      | ``<cwd>/.cache``                  |
| ``benchmark_export_dir()`` | ``MARKETPLACE_BENCHMARK_DATA`` | ``<cwd>/../shared/marketplace`` (the real export) |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _path_from_env(variable: str, default: str) -> Path:
    """``$variable`` if set and non-empty, else ``default``; relative paths are made absolute against the cwd."""
    return Path(os.environ.get(variable) or default).expanduser().absolute()


def default_db_url() -> str:
    """SQLAlchemy URL of the marketplace database (``MARKETPLACE_DB_URL`` or a SQLite file under ``data/``)."""
    url = os.environ.get("MARKETPLACE_DB_URL")
    if url:
        return url
    return f"sqlite:///{Path.cwd() / 'data' / 'marketplace.db'}"


def default_image_location() -> str:
    """Where the photos are: a folder, or ``s3://bucket/prefix`` (``MARKETPLACE_IMAGES``, default ``data/images``)."""
    location = os.environ.get("MARKETPLACE_IMAGES")
    if location:
        return location
    return str(Path.cwd() / "data" / "images")


def checkpoints_dir() -> Path:
    """Folder of locally saved model checkpoints (``MARKETPLACE_CHECKPOINTS``, default ``checkpoints/``)."""
    return _path_from_env("MARKETPLACE_CHECKPOINTS", "checkpoints")


def reports_dir() -> Path:
    """Folder for benchmark and evaluation reports (``MARKETPLACE_REPORTS``, default ``reports/``)."""
    return _path_from_env("MARKETPLACE_REPORTS", "reports")


def cache_dir() -> Path:
    """Folder for downloaded files such as S3 photos (``MARKETPLACE_CACHE``, default ``.cache/``)."""
    return _path_from_env("MARKETPLACE_CACHE", ".cache")


def benchmark_export_dir() -> Path:
    """The CSV export the benchmarks read by default (``MARKETPLACE_BENCHMARK_DATA``, default ``../shared/marketplace``:
    the real listings beside a checkout)."""
    return _path_from_env("MARKETPLACE_BENCHMARK_DATA", "../shared/marketplace").resolve()


def s3_client(*, read_timeout: float, max_pool_connections: int = 10) -> Any:
    """A boto3 S3 client for the endpoint and credentials of the environment (``AWS_ENDPOINT_URL``, ...).

    Short connect timeout and few retries: an unreachable endpoint should fail in seconds, not minutes.
    """
    import boto3  # here, so that reading a setting does not import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=read_timeout, retries={"max_attempts": 3, "mode": "standard"},
                    max_pool_connections=max_pool_connections)
    return boto3.client("s3", config=config)
