"""Where checkpoints live: a local folder, an S3 bucket or the Hugging Face Hub, behind one interface.

A *target* string names a checkpoint on one of the three hubs; the first rule that applies wins:

1. ``s3://bucket/prefix/name``: S3, objects ``prefix/name/<revision>/<file>`` plus a ``.manifest.json``
   (sha256 and size of every file, written last) per revision; boto3 is configured by the standard AWS
   environment (``AWS_ENDPOINT_URL``, credentials, region).
2. ``file://path``, an absolute path, or a path starting with ``.`` or ``~``: a local folder.
3. A bare name without ``/`` (``hog-svm``): that name in the local checkpoints folder
   (``settings.checkpoints_dir()``, default ``checkpoints/``).
4. An existing relative folder: that folder.
5. ``org/repo``: a Hugging Face Hub model repository (endpoint ``HF_ENDPOINT`` and token ``HF_TOKEN``
   or the saved login, read at call time). Revisions are branches, tags or commit shas; pushing to a new
   revision creates the branch.
6. Anything else: a local folder path (``exports/models/hog-svm``).

Revisions: every hub defaults to ``main``. Locally ``main`` is the folder ``<root>/<name>`` itself and any
other revision is the sibling folder ``<root>/<name>@<revision>``.

``resolve_checkpoint`` makes a checkpoint available as a local folder (remote ones are downloaded into
``settings.cache_dir()/checkpoints/``) and reports its resolved revision: the commit sha on the Hugging
Face Hub, the revision name on S3, a content hash for local folders. Every transfer is verified: each file
that arrives is compared by sha256 (or git blob id, for small files on the Hugging Face Hub) with what the
hub says it should be, and a mismatch raises ``HubError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import HFValidationError, HTTPError, RepositoryNotFoundError, RevisionNotFoundError

from ..settings import cache_dir, checkpoints_dir, s3_client
from ._format import CONFIG_FILE, WEIGHTS_FILE, content_revision, file_sha256, read_config
from .errors import CheckpointError, CheckpointNotFoundError, HubError

DEFAULT_REVISION = "main"
S3_MANIFEST = ".manifest.json"
_HF_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_REVISION = re.compile(r"[\w.-]+(/[\w.-]+)*")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint made available as a local folder, with the name and revision it came from."""

    folder: Path
    name: str
    revision: str


class Hub(ABC):
    """A place that keeps checkpoint folders under names and revisions."""

    @abstractmethod
    def push(self, folder: Path, name: str, revision: str | None = None) -> str:
        """Upload the checkpoint ``folder`` as ``name`` at ``revision``; return the resolved revision."""

    @abstractmethod
    def fetch(self, name: str, revision: str | None = None) -> ResolvedCheckpoint:
        """Make ``name`` at ``revision`` available as a verified local folder."""


# ---- files and checksums ---------------------------------------------------------------------
def checkpoint_files(folder: Path) -> list[str]:
    """The files a transfer carries: every file under ``folder`` as a relative POSIX path, hidden ones excepted.

    Hidden files and folders (``.manifest.json``, the ``.cache/`` that downloads leave) belong to the hubs.
    """
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _check_checkpoint_folder(folder: Path) -> None:
    """Refuse to push anything that is not a readable checkpoint folder."""
    read_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: missing; {folder} is not a complete checkpoint")


def _check_revision(revision: str | None) -> str:
    revision = revision or DEFAULT_REVISION
    if not _REVISION.fullmatch(revision) or ".." in revision:
        raise HubError(f"invalid revision {revision!r}: use letters, digits, '.', '_', '-' and '/' separators")
    return revision


def _copy_verified(source: Path, destination: Path) -> None:
    """Replace ``destination`` by a copy of the checkpoint files in ``source``, each verified by sha256.

    The copy is assembled beside ``destination`` and renamed into place, so a failed copy never leaves a
    half-written checkpoint behind.
    """
    if destination.exists() and destination.resolve() == source.resolve():
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it 0700) so the checkpoint gets the umask's permissions like any folder.
    staging = destination.parent / f".{destination.name}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for relative in checkpoint_files(source):
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / relative, target)
            if file_sha256(target) != file_sha256(source / relative):
                raise HubError(f"{destination / relative}: copy of {source / relative} does not match it (sha256)")
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- local folder ----------------------------------------------------------------------------
class LocalHub(Hub):
    """Checkpoints as folders under ``root``: ``<name>`` for ``main``, ``<name>@<revision>`` otherwise."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, name: str, revision: str | None = None) -> Path:
        """The folder holding ``name`` at ``revision``."""
        revision = _check_revision(revision)
        return self.root / (name if revision == DEFAULT_REVISION else f"{name}@{revision}")

    def push(self, folder: Path, name: str, revision: str | None = None) -> str:
        destination = self.folder(name, revision)
        _copy_verified(folder, destination)
        return content_revision(destination)

    def fetch(self, name: str, revision: str | None = None) -> ResolvedCheckpoint:
        folder = self.folder(name, revision)
        if not (folder / CONFIG_FILE).is_file():
            raise CheckpointNotFoundError(f"no checkpoint at {folder}: no {CONFIG_FILE} there")
        return ResolvedCheckpoint(folder, name, content_revision(folder))


# ---- S3 --------------------------------------------------------------------------------------
class S3Hub(Hub):
    """Checkpoints as objects ``<prefix>/<name>/<revision>/<file>`` with a sha256 manifest per revision."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not bucket:
            raise HubError("S3 target names no bucket (expected s3://bucket/prefix/name)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = s3_client(read_timeout=60)

    def _key(self, name: str, revision: str, relative: str = "") -> str:
        return "/".join(part for part in (self.prefix, name, revision, relative) if part)

    def url(self, name: str, revision: str | None = None, relative: str = "") -> str:
        """``s3://`` URL of a checkpoint revision (or of one of its files), for messages."""
        return f"s3://{self.bucket}/{self._key(name, _check_revision(revision), relative)}"

    def _failure(self, exc: Exception, what: str) -> CheckpointError:
        """Translate a boto3 failure into the project's errors."""
        if isinstance(exc, NoCredentialsError):
            return HubError(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code == "NoSuchBucket":
                return HubError(f"{what}: bucket {self.bucket!r} does not exist")
            if code in ("NoSuchKey", "404", "NotFound"):
                return CheckpointNotFoundError(f"{what}: no such object")
            return HubError(f"{what}: {code} {error.get('Message', '')}".rstrip())
        return HubError(f"{what}: {exc} (endpoint {self._client.meta.endpoint_url})")

    def push(self, folder: Path, name: str, revision: str | None = None) -> str:
        revision = _check_revision(revision)
        manifest: dict[str, dict[str, Any]] = {"files": {}}
        try:
            for relative in checkpoint_files(folder):
                path = folder / relative
                manifest["files"][relative] = {"sha256": file_sha256(path), "size": path.stat().st_size}
                # One streamed PUT per file (up to 5 GB, far above any checkpoint); errors stay ClientErrors.
                with path.open("rb") as handle:
                    self._client.put_object(Bucket=self.bucket, Key=self._key(name, revision, relative), Body=handle)
            # Written last: a revision without its manifest is an unfinished upload and cannot be pulled.
            self._client.put_object(Bucket=self.bucket, Key=self._key(name, revision, S3_MANIFEST),
                                    Body=json.dumps(manifest, indent=2).encode(), ContentType="application/json")
        except (BotoCoreError, ClientError) as exc:
            raise self._failure(exc, f"upload to {self.url(name, revision)}") from exc
        return revision

    def fetch(self, name: str, revision: str | None = None) -> ResolvedCheckpoint:
        revision = _check_revision(revision)
        manifest_url = self.url(name, revision, S3_MANIFEST)
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(name, revision, S3_MANIFEST))["Body"]
            files: dict[str, dict[str, Any]] = json.loads(body.read())["files"]
        except (BotoCoreError, ClientError) as exc:
            failure = self._failure(exc, manifest_url)
            if isinstance(failure, CheckpointNotFoundError):
                failure = CheckpointNotFoundError(f"no checkpoint at {self.url(name, revision)}: {S3_MANIFEST} missing")
            raise failure from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise HubError(f"{manifest_url}: not a checkpoint manifest ({exc})") from exc

        folder = cache_dir() / "checkpoints" / "s3" / self.bucket / self._key(name, revision)
        folder.mkdir(parents=True, exist_ok=True)
        for relative in set(checkpoint_files(folder)) - set(files):
            (folder / relative).unlink()  # left over from an earlier upload of this revision
        for relative, expected in files.items():
            target = folder / relative
            # The cache is trusted only as far as its checksum goes.
            if target.is_file() and file_sha256(target) == expected["sha256"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.part")
            url = self.url(name, revision, relative)
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=self._key(name, revision, relative))["Body"]
                with partial.open("wb") as handle:
                    shutil.copyfileobj(body, handle, _CHUNK)
            except (BotoCoreError, ClientError) as exc:
                raise self._failure(exc, url) from exc
            actual = file_sha256(partial)
            if actual != expected["sha256"] or partial.stat().st_size != expected["size"]:
                partial.unlink()
                raise HubError(f"{url}: download does not match the manifest (sha256 {actual}, "
                               f"expected {expected['sha256']}); the object is corrupted or was overwritten")
            partial.replace(target)
        return ResolvedCheckpoint(folder, f"s3://{self.bucket}/{self._key(name, '')}", revision)


# ---- Hugging Face Hub ------------------------------------------------------------------------
def _hf_endpoint() -> str:
    """``HF_ENDPOINT`` as set now (huggingface_hub itself reads it only once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


class HuggingFaceHub(Hub):
    """Checkpoints as model repositories on the Hugging Face Hub (or any server speaking its API)."""

    def __init__(self) -> None:
        self.endpoint = _hf_endpoint()
        self.api = HfApi(endpoint=self.endpoint, library_name="marketplace_reco")

    def _failure(self, exc: Exception, repo_id: str, revision: str) -> CheckpointError:
        where = f"{self.endpoint}/{repo_id} (revision {revision})"
        if isinstance(exc, RevisionNotFoundError):
            return CheckpointNotFoundError(f"{where}: no such revision")
        if isinstance(exc, RepositoryNotFoundError):
            return CheckpointNotFoundError(f"{where}: no such repository, or no access to it (check HF_TOKEN)")
        return HubError(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip())

    def push(self, folder: Path, name: str, revision: str | None = None) -> str:
        revision = _check_revision(revision)
        try:
            self.api.create_repo(name, repo_type="model", exist_ok=True)
            if revision != DEFAULT_REVISION:
                self.api.create_branch(name, branch=revision, exist_ok=True)
            commit = self.api.upload_folder(
                repo_id=name,
                folder_path=folder,
                revision=revision,
                allow_patterns=checkpoint_files(folder),
                commit_message=f"Upload {read_config(folder)[0]['model_type']} checkpoint",
            )
        except (HTTPError, OSError, HFValidationError) as exc:
            raise self._failure(exc, name, revision) from exc
        return str(commit.oid)

    def fetch(self, name: str, revision: str | None = None) -> ResolvedCheckpoint:
        revision = _check_revision(revision)
        try:
            sha = str(self.api.repo_info(name, revision=revision).sha)
            folder = cache_dir() / "checkpoints" / "huggingface" / name / sha
            snapshot_download(name, revision=sha, local_dir=folder, endpoint=self.endpoint,
                              library_name="marketplace_reco")
            verification = self.api.verify_repo_checksums(name, revision=sha, local_dir=folder)
        except (HTTPError, OSError, HFValidationError) as exc:
            raise self._failure(exc, name, revision) from exc
        problems = [f"{folder / m['path']}: {m['algorithm']} {m['actual']}, the Hub says {m['expected']}"
                    for m in verification.mismatches]
        problems += [f"{folder / path}: missing after download" for path in verification.missing_paths]
        if problems:
            # Drop the damaged files: the download metadata would otherwise make the next attempt skip them.
            for mismatch in verification.mismatches:
                (folder / mismatch["path"]).unlink(missing_ok=True)
            raise HubError(f"{name} at {sha}: download did not arrive whole: " + "; ".join(problems))
        return ResolvedCheckpoint(folder, name, sha)


# ---- choosing a hub --------------------------------------------------------------------------
def hub_for(target: str) -> tuple[Hub, str]:
    """The hub a target string names and the checkpoint's name there (rules in the module docstring)."""
    if target.startswith("s3://"):
        bucket, _, key = target[len("s3://"):].partition("/")
        parts = [part for part in key.split("/") if part]
        if not bucket or not parts:
            raise HubError(f"S3 target {target!r} must name a bucket and a checkpoint: s3://bucket/prefix/name")
        return S3Hub(bucket, "/".join(parts[:-1])), parts[-1]
    if target.startswith("file://"):
        return _local(Path(target[len("file://"):]))
    path = Path(target).expanduser()
    if path.is_absolute() or target.startswith((".", "~")):
        return _local(path)
    if "/" not in target:
        return LocalHub(checkpoints_dir()), target
    if path.is_dir() or not _HF_REPO_ID.fullmatch(target):
        return _local(path)
    return HuggingFaceHub(), target


def _local(path: Path) -> tuple[LocalHub, str]:
    path = path.absolute()
    if not path.name:
        raise HubError(f"{path}: a checkpoint folder cannot be a filesystem root")
    return LocalHub(path.parent), path.name


def resolve_checkpoint(name_or_path: str, revision: str | None = None) -> ResolvedCheckpoint:
    """Make a checkpoint available as a local folder: local names and folders in place, remote ones downloaded
    (and verified) into the cache."""
    hub, name = hub_for(str(name_or_path))
    resolved = hub.fetch(name, revision)
    return ResolvedCheckpoint(resolved.folder, str(name_or_path), resolved.revision)


def push_checkpoint(folder: str | Path, target: str, revision: str | None = None) -> str:
    """Upload the checkpoint ``folder`` to ``target`` at ``revision`` (default ``main``); return the resolved
    revision (Hugging Face commit sha, S3 revision name, local content hash)."""
    folder = Path(folder)
    _check_checkpoint_folder(folder)
    hub, name = hub_for(target)
    return hub.push(folder, name, revision)


def pull_checkpoint(source: str, destination: str | Path, revision: str | None = None) -> Path:
    """Copy the checkpoint ``source`` at ``revision`` into the folder ``destination`` (replaced if present);
    every file is verified on arrival."""
    resolved = resolve_checkpoint(source, revision)
    destination = Path(destination)
    _copy_verified(resolved.folder, destination)
    return destination
