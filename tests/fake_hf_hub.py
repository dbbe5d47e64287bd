"""A small, real HTTP server that answers the Hugging Face Hub API calls ``huggingface_hub`` makes.

The real Hub is unreachable in the tests, so ``HF_ENDPOINT`` is pointed at this server and the real
client code runs end to end against it. It implements exactly what checkpoints need:

- ``POST /api/repos/create``: a model repository with an empty first commit on ``main``;
- ``POST /api/models/{repo}/branch/{branch}``: a branch at ``startingPoint`` (default: ``main``);
- ``POST /api/validate-yaml``: the README.md front matter must parse as YAML;
- ``POST /api/models/{repo}/preupload/{rev}``: ``lfs`` for binary samples and ``*.safetensors``, else ``regular``;
- ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT /lfs/{oid}``, ``POST /lfs/verify``: the LFS basic transfer
  (the upload is refused unless its sha256 is the announced oid);
- ``POST /api/models/{repo}/commit/{rev}``: ndjson commits of ``file`` (base64), ``lfsFile`` and ``deletedFile``;
- ``GET /api/models/{repo}/revision/{rev}`` and ``GET /api/models/{repo}/tree/{rev}``: repo info and file listing
  with git blob ids and LFS sha256, as the Hub reports them;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: file content with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag`` and ``X-Linked-Size``.

It does not implement Xet storage: tests disable it with the client's own switch (``HF_HUB_DISABLE_XET``),
so uploads take the LFS path. Write calls require ``Authorization: Bearer <token>`` when the server has a
token. Errors carry the Hub's ``X-Error-Code`` headers so the client raises its usual exceptions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_SEGMENT = r"(?P<rev>[^/]+)"
_LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".jpg")


def _git_blob_sha1(content: bytes) -> str:
    """The object id git gives a blob: sha1 of ``blob <size>\\0<content>``."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class _Entry:
    """One file in a commit's tree."""

    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file stored in git in place of an LFS file's content."""
        lines = ("version https://git-lfs.github.com/spec/v1", f"oid sha256:{self.sha256}", f"size {len(self.content)}")
        return ("\n".join(lines) + "\n").encode()

    @property
    def blob_id(self) -> str:
        return _git_blob_sha1(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class _Repo:
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, _Entry]] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """A branch name or a full commit sha -> the commit sha, or None."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class ApiError(Exception):
    """An API error: HTTP status, the Hub's ``X-Error-Code`` and a message."""

    def __init__(self, status: HTTPStatus, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.extra = extra


class FakeHub:
    """The Hub's state (repositories, commits, LFS objects) and the HTTP server in a thread."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        # (commit, path) -> bytes served instead of the stored content, set by corrupt().
        self._damaged: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- test helpers -------------------------------------------------------------------------
    def corrupt(self, repo_id: str, revision: str, path: str) -> None:
        """From now on serve ``path`` of ``revision`` with its last byte flipped (same size, same reported ids)."""
        with self._lock:
            repo = self._repo(repo_id)
            sha = self._commit(repo, revision)
            content = repo.commits[sha][path].content
            self._damaged[(sha, path)] = content[:-1] + bytes([content[-1] ^ 0xFF])

    # ---- state transitions (called with the lock held) ----------------------------------------
    def _repo(self, repo_id: str) -> _Repo:
        try:
            return self.repos[repo_id]
        except KeyError:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Repository {repo_id} not found", "RepoNotFound") from None

    def _commit(self, repo: _Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _new_commit(self, repo: _Repo, parent: str | None, tree: dict[str, _Entry], summary: str) -> str:
        listing = sorted((path, entry.blob_id) for path, entry in tree.items())
        sha = hashlib.sha1(json.dumps([parent, listing, summary, len(repo.commits)]).encode()).hexdigest()
        repo.commits[sha] = tree
        return sha

    def create_repo(self, body: dict[str, Any]) -> dict[str, Any]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if body.get("type", "model") != "model":
            raise ApiError(HTTPStatus.BAD_REQUEST, "only model repositories are served here")
        if repo_id in self.repos:
            # The Hub's conflict answer still carries the URL, which create_repo(exist_ok=True) returns.
            raise ApiError(HTTPStatus.CONFLICT, "You already created this model repo", url=f"{self.endpoint}/{repo_id}")
        repo = self.repos[repo_id] = _Repo()
        repo.branches["main"] = self._new_commit(repo, None, {}, "initial commit")
        return {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    def create_branch(self, repo_id: str, branch: str, body: dict[str, Any]) -> dict[str, Any]:
        repo = self._repo(repo_id)
        if branch in repo.branches:
            raise ApiError(HTTPStatus.CONFLICT, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = self._commit(repo, body.get("startingPoint") or "main")
        return {}

    def preupload(self, repo_id: str, revision: str, body: dict[str, Any]) -> dict[str, Any]:
        repo = self._repo(repo_id)
        tree = repo.commits[self._commit(repo, revision)]
        files = []
        for item in body["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["path"].endswith(_LFS_SUFFIXES) or b"\x00" in sample
            existing = tree.get(item["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.blob_id)
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return {"files": files}

    def lfs_batch(self, repo_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self._repo(repo_id)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise ApiError(HTTPStatus.BAD_REQUEST, "only the basic upload transfer is served here")
        objects = []
        for obj in body["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:
                answer["actions"] = {"upload": {"href": f"{self.endpoint}/lfs/{obj['oid']}"},
                                     "verify": {"href": f"{self.endpoint}/lfs/verify"}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, content: bytes) -> dict[str, Any]:
        if hashlib.sha256(content).hexdigest() != oid:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"uploaded content does not hash to {oid}")
        self.lfs_objects[oid] = content
        return {}

    def lfs_verify(self, body: dict[str, Any]) -> dict[str, Any]:
        content = self.lfs_objects.get(body["oid"])
        if content is None or len(content) != body["size"]:
            raise ApiError(HTTPStatus.NOT_FOUND, f"LFS object {body['oid']} of size {body['size']} not uploaded")
        return {}

    def commit(self, repo_id: str, revision: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
        repo = self._repo(repo_id)
        if revision not in repo.branches:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision} is not a branch", "RevisionNotFound")
        parent = repo.branches[revision]
        header = next(line["value"] for line in lines if line["key"] == "header")
        if header.get("parentCommit") not in (None, parent):
            raise ApiError(HTTPStatus.PRECONDITION_FAILED, f"parent commit is {parent}, not {header['parentCommit']}")
        tree = dict(repo.commits[parent])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = _Entry(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, f"LFS object {value['oid']} was never uploaded")
                tree[value["path"]] = _Entry(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise ApiError(HTTPStatus.NOT_FOUND, "A file with this name doesn't exist", "EntryNotFound")
            elif key != "header":
                raise ApiError(HTTPStatus.BAD_REQUEST, f"commit operation {key!r} is not served here")
        sha = repo.branches[revision] = self._new_commit(repo, parent, tree, header["summary"])
        return {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    def repo_info(self, repo_id: str, revision: str) -> dict[str, Any]:
        repo = self._repo(repo_id)
        sha = self._commit(repo, revision)
        return {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                "siblings": [{"rfilename": path} for path in sorted(repo.commits[sha])]}

    def tree(self, repo_id: str, revision: str) -> list[dict[str, Any]]:
        repo = self._repo(repo_id)
        entries = []
        for path, entry in sorted(repo.commits[self._commit(repo, revision)].items()):
            item: dict[str, Any] = {"type": "file", "path": path, "oid": entry.blob_id, "size": len(entry.content)}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": len(entry.content), "pointerSize": len(entry.pointer)}
            entries.append(item)
        return entries

    def resolve_file(self, repo_id: str, revision: str, path: str) -> tuple[bytes, dict[str, str]]:
        repo = self._repo(repo_id)
        sha = self._commit(repo, revision)
        entry = repo.commits[sha].get(path)
        if entry is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Entry {path} not found at {revision}", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.blob_id}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(len(entry.content))})
        return self._damaged.get((sha, path), entry.content), headers


def _validate_yaml(body: dict[str, Any]) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", body.get("content", ""), flags=re.DOTALL)
    if match:
        try:
            yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid YAML metadata: {exc}") from exc
    return {"errors": [], "warnings": []}


# (method, path pattern, needs write access, handler(hub, match, query, body bytes) -> JSON-able answer)
_ROUTES: list[tuple[str, re.Pattern[str], bool, Any]] = [
    ("POST", re.compile(r"/api/repos/create"), True, lambda hub, m, body: hub.create_repo(json.loads(body))),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/{_SEGMENT}"), True,
     lambda hub, m, body: hub.create_branch(m["repo"], unquote(m["rev"]), json.loads(body or b"{}"))),
    ("POST", re.compile(r"/api/validate-yaml"), False, lambda hub, m, body: _validate_yaml(json.loads(body))),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/{_SEGMENT}"), True,
     lambda hub, m, body: hub.preupload(m["repo"], unquote(m["rev"]), json.loads(body))),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), True,
     lambda hub, m, body: hub.lfs_batch(m["repo"], json.loads(body))),
    ("PUT", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})"), False, lambda hub, m, body: hub.lfs_put(m["oid"], body)),
    ("POST", re.compile(r"/lfs/verify"), True, lambda hub, m, body: hub.lfs_verify(json.loads(body))),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/{_SEGMENT}"), True,
     lambda hub, m, body: hub.commit(m["repo"], unquote(m["rev"]), [json.loads(x) for x in body.splitlines() if x])),
    ("GET", re.compile(rf"/api/models/{_REPO}/revision/{_SEGMENT}"), False,
     lambda hub, m, body: hub.repo_info(m["repo"], unquote(m["rev"]))),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/{_SEGMENT}"), False,
     lambda hub, m, body: hub.tree(m["repo"], unquote(m["rev"]))),
]
_RESOLVE = re.compile(rf"/{_REPO}/resolve/{_SEGMENT}/(?P<path>.+)")


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            """Silent: pytest shows failures, not every request."""

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: HTTPStatus, body: bytes, headers: dict[str, str], send_body: bool = True) -> None:
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _authorised(self) -> bool:
            return hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _dispatch(self, method: str) -> None:
            path = urlsplit(self.path).path
            body = self._body() if method in ("POST", "PUT") else b""
            try:
                with hub._lock:
                    if method in ("GET", "HEAD") and (match := _RESOLVE.fullmatch(path)):
                        content, headers = hub.resolve_file(match["repo"], unquote(match["rev"]),
                                                            unquote(match["path"]))
                        self._send(HTTPStatus.OK, content, headers, send_body=method == "GET")
                        return
                    for route_method, pattern, write, handler in _ROUTES:
                        if route_method == method and (match := pattern.fullmatch(path)):
                            if write and not self._authorised():
                                raise ApiError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
                            answer = json.dumps(handler(hub, match, body)).encode()
                            self._send(HTTPStatus.OK, answer, {"Content-Type": "application/json"})
                            return
                raise ApiError(HTTPStatus.NOT_FOUND, f"{method} {path} is not served by the fake Hub")
            except ApiError as exc:
                headers = {"Content-Type": "application/json", "X-Error-Message": str(exc)}
                if exc.code:
                    headers["X-Error-Code"] = exc.code
                answer = json.dumps({"error": str(exc), **exc.extra}).encode()
                self._send(exc.status, answer, headers, send_body=method != "HEAD")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._dispatch("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch("HEAD")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._dispatch("PUT")

    return Handler
