"""Where the photos live: a local folder or an S3 bucket, behind one interface keyed by image id.

``open_image_store("data/images")`` or ``open_image_store("s3://bucket/prefix")``. Keys are
``<prefix>/<image id>.jpg`` in a bucket (the users' bucket uses ``images/<id>.jpg``) and
``<folder>/<image id>.jpg`` on disk.

S3 goes through boto3 configured only by the standard AWS environment (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or any
other credential source boto3 knows), so any S3-compatible server works. Downloaded photos are cached
on disk (``settings.cache_dir()/images/<bucket>/<prefix>``): photos are immutable per id, and a
training run reads each one once per epoch. The cache is keyed by bucket and prefix only, so point
``MARKETPLACE_CACHE`` elsewhere when two S3 servers hold buckets of the same name.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .._progress import progress_bar
from ..settings import cache_dir, default_image_location, s3_client
from .errors import ImageNotFoundError, ImageStoreError, ImageStoreUnreachableError, InvalidImageIdError
from .schema import ID_PATTERN

_IMAGE_ID = re.compile(ID_PATTERN)
_SUFFIX = ".jpg"
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class ImageStore(ABC):
    """Photos by image id. ``location`` is the string the store was opened from (for messages)."""

    location: str

    def _check_id(self, image_id: str) -> str:
        # Ids become file and key names: refuse anything that could escape the folder or prefix.
        if not isinstance(image_id, str) or not _IMAGE_ID.fullmatch(image_id):
            raise InvalidImageIdError(str(image_id), self.location)
        return image_id

    @abstractmethod
    def get(self, image_id: str) -> bytes:
        """The encoded photo; ``ImageNotFoundError`` if absent, ``ImageStoreUnreachableError`` if the store fails."""

    @abstractmethod
    def put(self, image_id: str, data: bytes) -> None:
        """Store (or replace) the encoded photo of ``image_id``."""

    @abstractmethod
    def exists(self, image_id: str) -> bool:
        """Whether the store holds a photo for ``image_id``."""

    @abstractmethod
    def list_ids(self) -> list[str]:
        """Ids of all photos in the store, sorted."""

    @abstractmethod
    def uri(self, image_id: str) -> str:
        """Where the photo of ``image_id`` is: a file path or an ``s3://`` URI."""

    def get_many(self, image_ids: Iterable[str], max_workers: int = 8, progress: bool = False) -> dict[str, bytes]:
        """Fetch several photos concurrently; the first failure (in id order) is raised."""
        ids = list(dict.fromkeys(image_ids))
        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            results = pool.map(self.get, ids)
            fetched = list(progress_bar(results, total=len(ids), desc="fetch images", unit="img",
                                        disable=not progress))
        return dict(zip(ids, fetched))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


class LocalImageStore(ImageStore):
    """Photos as ``<folder>/<image id>.jpg``."""

    def __init__(self, folder: str | Path, *, create: bool = False) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.location = str(self.folder)
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
        elif not self.folder.is_dir():
            raise ImageStoreUnreachableError(self.location, "folder does not exist")

    def _path(self, image_id: str) -> Path:
        return self.folder / f"{self._check_id(image_id)}{_SUFFIX}"

    def get(self, image_id: str) -> bytes:
        path = self._path(image_id)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            if not self.folder.is_dir():
                raise ImageStoreUnreachableError(self.location, "folder does not exist") from exc
            raise ImageNotFoundError(image_id, self.location) from exc
        except OSError as exc:
            raise ImageStoreUnreachableError(self.location, f"cannot read {path.name}: {exc.strerror or exc}") from exc

    def put(self, image_id: str, data: bytes) -> None:
        _atomic_write(self._path(image_id), data)

    def exists(self, image_id: str) -> bool:
        return self._path(image_id).is_file()

    def list_ids(self) -> list[str]:
        return sorted(p.name[: -len(_SUFFIX)] for p in self.folder.glob(f"*{_SUFFIX}")
                      if _IMAGE_ID.fullmatch(p.name[: -len(_SUFFIX)]))

    def uri(self, image_id: str) -> str:
        return str(self._path(image_id))


class S3ImageStore(ImageStore):
    """Photos as objects ``<prefix>/<image id>.jpg`` in ``bucket``, read through an on-disk cache."""

    def __init__(self, bucket: str, prefix: str = "", *, cache_folder: str | Path | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        default_cache = cache_dir() / "images" / bucket / self.prefix
        self.cache_folder = Path(cache_folder) if cache_folder is not None else default_cache
        try:
            # Enough connections for the concurrent fetches of ``get_many``.
            self._client = s3_client(read_timeout=30, max_pool_connections=32)
        except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
            raise ImageStoreUnreachableError(self.location, str(exc)) from exc
        self._bucket_checked = False
        self._lock = threading.Lock()

    def _key(self, image_id: str) -> str:
        name = f"{self._check_id(image_id)}{_SUFFIX}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _unreachable(self, exc: Exception) -> ImageStoreUnreachableError:
        """Translate a boto3 failure that concerns the bucket or endpoint, not one object."""
        if isinstance(exc, NoCredentialsError):
            return ImageStoreUnreachableError(self.location, "no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                                                             "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchBucket", "404", "NotFound"):
                return ImageStoreUnreachableError(self.location, f"bucket {self.bucket!r} does not exist")
            if code in ("AccessDenied", "403", "Forbidden"):
                return ImageStoreUnreachableError(self.location, f"access denied to bucket {self.bucket!r}")
            return ImageStoreUnreachableError(self.location, f"{code}: {error.get('Message', exc)}")
        endpoint = self._client.meta.endpoint_url
        return ImageStoreUnreachableError(self.location, f"{exc} (endpoint {endpoint})")

    def _ensure_bucket(self) -> None:
        """Check the bucket once, so that a 404 on an object later means the object is missing."""
        if self._bucket_checked:
            return
        with self._lock:
            if self._bucket_checked:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except (ClientError, BotoCoreError) as exc:
                raise self._unreachable(exc) from exc
            self._bucket_checked = True

    def _cache_path(self, image_id: str) -> Path:
        return self.cache_folder / f"{self._check_id(image_id)}{_SUFFIX}"

    def get(self, image_id: str) -> bytes:
        cached = self._cache_path(image_id)
        if cached.is_file():
            return cached.read_bytes()
        self._ensure_bucket()
        try:
            data: bytes = self._client.get_object(Bucket=self.bucket, Key=self._key(image_id))["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING_KEY_CODES:
                raise ImageNotFoundError(image_id, self.location) from exc
            raise self._unreachable(exc) from exc
        except BotoCoreError as exc:
            raise self._unreachable(exc) from exc
        _atomic_write(cached, data)
        return data

    def put(self, image_id: str, data: bytes) -> None:
        self._ensure_bucket()
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(image_id), Body=data, ContentType="image/jpeg")
        except (ClientError, BotoCoreError) as exc:
            raise self._unreachable(exc) from exc
        # Write-through, so a replaced photo never leaves a stale cached copy.
        _atomic_write(self._cache_path(image_id), data)

    def exists(self, image_id: str) -> bool:
        self._ensure_bucket()
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(image_id))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING_KEY_CODES:
                return False
            raise self._unreachable(exc) from exc
        except BotoCoreError as exc:
            raise self._unreachable(exc) from exc
        return True

    def list_ids(self) -> list[str]:
        self._ensure_bucket()
        start = f"{self.prefix}/" if self.prefix else ""
        ids: list[str] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(start):]
                    if name.endswith(_SUFFIX) and _IMAGE_ID.fullmatch(name[: -len(_SUFFIX)]):
                        ids.append(name[: -len(_SUFFIX)])
        except (ClientError, BotoCoreError) as exc:
            raise self._unreachable(exc) from exc
        return sorted(ids)

    def uri(self, image_id: str) -> str:
        return f"s3://{self.bucket}/{self._key(image_id)}"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so concurrent readers never see half a photo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_image_store(location: str | Path | None = None, *, create: bool = False,
                     cache_folder: str | Path | None = None) -> ImageStore:
    """The store at ``location``: ``s3://bucket[/prefix]`` or a folder (None: ``settings.default_image_location()``).

    ``create=True`` creates a missing local folder (for writing); S3 buckets are never created.
    ``cache_folder`` overrides the S3 download cache folder.
    """
    location = str(location) if location is not None else default_image_location()
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        if not bucket:
            raise ImageStoreError(f"image store location {location!r} names no bucket (expected s3://bucket/prefix)")
        return S3ImageStore(bucket, prefix, cache_folder=cache_folder)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location):
        raise ImageStoreError(f"unsupported image store location {location!r}: use a folder or s3://bucket/prefix")
    return LocalImageStore(location, create=create)


def copy_images(source: ImageStore, target: ImageStore, image_ids: Sequence[str] | None = None, *,
                skip_existing: bool = False, max_workers: int = 8, progress: bool = True) -> int:
    """Copy photos (all of ``source`` when ``image_ids`` is None) into ``target``; returns how many were copied.

    ``skip_existing`` leaves photos the target already holds alone (one existence check each), so an
    interrupted upload can be resumed.
    """
    ids = list(image_ids) if image_ids is not None else source.list_ids()

    def _copy(image_id: str) -> bool:
        if skip_existing and target.exists(image_id):
            return False
        target.put(image_id, source.get(image_id))
        return True

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        copied = list(progress_bar(pool.map(_copy, ids), total=len(ids), desc=f"copy to {target.location}",
                                   unit="img", disable=not progress))
    return sum(copied)
