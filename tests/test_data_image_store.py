"""Image stores against a local folder and a real S3 endpoint (moto server over HTTP)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from marketplace_reco.data.errors import (
    ImageNotFoundError,
    ImageStoreError,
    ImageStoreUnreachableError,
    InvalidImageIdError,
)
from marketplace_reco.data.image_store import ImageStore, LocalImageStore, S3ImageStore, copy_images, open_image_store
from services import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS = {f"img-{i:02d}": f"jpeg bytes {i}".encode() * (i + 1) for i in range(12)}


def _filled(store_location: str | Path, tmp_path: Path) -> ImageStore:
    store = open_image_store(store_location, create=True, cache_folder=tmp_path / "cache")
    for image_id, data in PHOTOS.items():
        store.put(image_id, data)
    return store


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = _filled(tmp_path / "images", tmp_path)
    assert isinstance(store, LocalImageStore)
    assert store.get("img-03") == PHOTOS["img-03"]
    assert (tmp_path / "images" / "img-03.jpg").read_bytes() == PHOTOS["img-03"]
    assert store.get_many(reversed(list(PHOTOS)), max_workers=4) == PHOTOS
    assert store.exists("img-00") and not store.exists("img-99")
    assert store.list_ids() == sorted(PHOTOS)
    assert store.uri("img-01") == str(tmp_path / "images" / "img-01.jpg")


def test_local_store_errors_name_the_id_and_location(tmp_path: Path) -> None:
    store = _filled(tmp_path / "images", tmp_path)
    with pytest.raises(ImageNotFoundError, match=f"image 'img-99' not found in {tmp_path / 'images'}"):
        store.get("img-99")
    with pytest.raises(ImageNotFoundError, match="img-99"):
        store.get_many(["img-01", "img-99"])
    with pytest.raises(InvalidImageIdError, match=r"'\.\./secret'"):
        store.get("../secret")
    with pytest.raises(ImageStoreUnreachableError, match=f"{tmp_path / 'nowhere'} is unreachable: folder does not"):
        open_image_store(tmp_path / "nowhere")
    with pytest.raises(ImageStoreError, match="unsupported image store location 'gs://bucket/images'"):
        open_image_store("gs://bucket/images")


def test_s3_store_round_trip_through_the_cache(s3_bucket: str, tmp_path: Path) -> None:
    store = _filled(f"s3://{s3_bucket}/images", tmp_path)
    assert isinstance(store, S3ImageStore)
    client = boto3.client("s3")
    keys = sorted(obj["Key"] for obj in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == sorted(f"images/{image_id}.jpg" for image_id in PHOTOS)

    fresh = open_image_store(f"s3://{s3_bucket}/images", cache_folder=tmp_path / "other-cache")
    assert fresh.get_many(PHOTOS, max_workers=8) == PHOTOS
    assert fresh.exists("img-05") and not fresh.exists("img-99")
    assert fresh.list_ids() == sorted(PHOTOS)
    assert fresh.uri("img-05") == f"s3://{s3_bucket}/images/img-05.jpg"
    # Served from the on-disk cache once fetched, even after the object is gone from the bucket.
    assert (tmp_path / "other-cache" / "img-05.jpg").read_bytes() == PHOTOS["img-05"]
    client.delete_object(Bucket=s3_bucket, Key="images/img-05.jpg")
    assert fresh.get("img-05") == PHOTOS["img-05"]


def test_s3_missing_object_names_the_id_and_location(s3_bucket: str, tmp_path: Path) -> None:
    store = _filled(f"s3://{s3_bucket}/images", tmp_path)
    with pytest.raises(ImageNotFoundError, match=f"image 'img-99' not found in s3://{s3_bucket}/images"):
        store.get("img-99")


def test_s3_wrong_bucket_is_unreachable(s3_endpoint: str, tmp_path: Path) -> None:
    store = open_image_store("s3://no-such-bucket/images", cache_folder=tmp_path)
    with pytest.raises(ImageStoreUnreachableError,
                       match="s3://no-such-bucket/images is unreachable: bucket 'no-such-bucket' does not exist"):
        store.get("img-01")
    with pytest.raises(ImageStoreUnreachableError, match="no-such-bucket"):
        store.put("img-01", b"data")


def test_s3_unreachable_endpoint_fails_fast(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    store = open_image_store("s3://bucket/images", cache_folder=tmp_path)
    started = time.monotonic()
    with pytest.raises(ImageStoreUnreachableError, match=f"s3://bucket/images is unreachable: .*{dead}"):
        store.get("img-01")
    assert time.monotonic() - started < 15


def test_copy_images_skips_what_is_already_there(s3_bucket: str, tmp_path: Path) -> None:
    source = _filled(tmp_path / "images", tmp_path)
    target = open_image_store(f"s3://{s3_bucket}/photos", cache_folder=tmp_path / "cache")
    assert copy_images(source, target, ["img-00", "img-01"], progress=False) == 2
    assert copy_images(source, target, skip_existing=True, progress=False) == len(PHOTOS) - 2
    assert target.list_ids() == sorted(PHOTOS)


def test_upload_script(s3_bucket: str, tmp_path: Path) -> None:
    _filled(tmp_path / "images", tmp_path)
    script = [sys.executable, str(REPO_ROOT / "scripts" / "upload_images.py"), "--no-progress"]
    # The subprocess inherits the endpoint and fake credentials the s3_endpoint fixture put in os.environ.
    env = {**os.environ, "MARKETPLACE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([*script, str(tmp_path / "images"), f"s3://{s3_bucket}/images"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"uploaded {len(PHOTOS)} photo(s)" in done.stdout
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="images/img-07.jpg")["Body"].read()
    assert body == PHOTOS["img-07"]

    failed = subprocess.run([*script, str(tmp_path / "images"), "s3://no-such-bucket/images"],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        "error: image store s3://no-such-bucket/images is unreachable: bucket 'no-such-bucket' does not exist"]
