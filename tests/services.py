"""Real backing services for the tests: throw-away PostgreSQL clusters and a moto S3 server.

The plain PostgreSQL server is Debian's (``scripts/install_services.sh``); the pgvector one runs PostgreSQL 16
with the ``vector`` extension from the binaries that the PyPI package ``pgserver`` ships (a dev dependency),
since Debian's PostgreSQL 15 has no pgvector package here. All of them run as subprocesses on a free loopback
port with their own temporary state and are stopped by ``stop()`` (or on leaving the ``with`` block). Nothing
here is mocked: the databases are real ``postgres`` servers and the S3 endpoint speaks the real HTTP protocol
that boto3 talks to.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psycopg2

# PostgreSQL refuses to run as root; these accounts are tried, in order, when the tests run as root.
_NON_ROOT_USERS = ("postgres", "nobody")
_START_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """A test service could not be started; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _temp_file(prefix: str, suffix: str) -> Path:
    """A new empty temporary file (closed; the caller deletes it)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix)
    os.close(fd)
    return Path(name)


def find_postgres_bin_dir() -> Path | None:
    """The folder holding ``initdb``/``pg_ctl``: PATH first, then Debian's /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    # Debian keeps the server binaries off PATH; prefer the newest major version.
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def find_pgvector_bin_dir() -> Path | None:
    """pgserver's PostgreSQL binaries, when the package is installed and ships the ``vector`` extension."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    install = Path(spec.origin).parent / "pginstall"
    if not (install / "share" / "postgresql" / "extension" / "vector.control").is_file():
        return None
    return install / "bin"


def _run_as(user: str | None, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv``, as ``user`` through runuser when given (we are root), capturing output."""
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _service_user() -> str | None:
    """None when not root; otherwise the first existing non-root account PostgreSQL may run as."""
    if os.geteuid() != 0:
        return None
    for name in _NON_ROOT_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise ServiceError(f"running as root and none of the accounts {_NON_ROOT_USERS} exists to run PostgreSQL")


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1:``port`` with trust authentication."""

    bin_dir: Path
    port: int = field(default_factory=free_port)
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="marketplace-pg-")))
    superuser: str = "postgres"
    _user: str | None = field(default=None, init=False)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server (psycopg2 driver)."""
        return f"postgresql+psycopg2://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        """initdb a fresh cluster into ``data_dir`` and start it, waiting until it accepts connections."""
        try:
            self._init_and_start()
        except BaseException:
            self.stop()  # leave no data directory (or half-started server) behind
            raise
        return self

    def _init_and_start(self) -> None:
        """initdb as the service user, then pg_ctl start on our port with the socket in our folder."""
        self._user = _service_user()
        if self._user is not None:
            # mkdtemp makes the folder 0700 for root; hand it to the account that runs the server.
            info = pwd.getpwnam(self._user)
            os.chown(self.data_dir, info.pw_uid, info.pw_gid)
        cluster = self.data_dir / "cluster"
        init = _run_as(
            self._user,
            [str(self.bin_dir / "initdb"), "-D", str(cluster), "-A", "trust", "-U", self.superuser,
             "-E", "UTF8", "--no-sync", "--locale=C"],
        )
        if init.returncode != 0:
            raise ServiceError(f"initdb into {cluster} failed:\n{init.stdout}{init.stderr}")
        # Socket in our own folder: /var/run/postgresql may not exist or belong to someone else.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data_dir} -c fsync=off"
        started = _run_as(
            self._user,
            [str(self.bin_dir / "pg_ctl"), "-D", str(cluster), "-o", options, "-l",
             str(self.data_dir / "server.log"), "-w", "-t", str(int(_START_TIMEOUT_S)), "start"],
        )
        if started.returncode != 0:
            log_file = self.data_dir / "server.log"
            log = log_file.read_text(errors="replace") if log_file.exists() else ""
            raise ServiceError(f"pg_ctl start on port {self.port} failed:\n{started.stdout}{started.stderr}\n{log}")

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its SQLAlchemy URL."""
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) if it runs, and delete its data directory."""
        cluster = self.data_dir / "cluster"
        # The pid file, not a flag: a start that timed out may still have left a server running.
        if (cluster / "postmaster.pid").exists():
            _run_as(self._user, [str(self.bin_dir / "pg_ctl"), "-D", str(cluster), "-m", "fast", "-w", "stop"])
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass
class PgvectorServer(PostgresServer):
    """A ``PostgresServer`` on pgserver's binaries, checked to offer the ``vector`` extension.

    When the account that runs PostgreSQL cannot execute the binaries where pip put them (a virtualenv under
    /root, say), pgserver's installation (about 35 MB) is copied into a temporary folder it can read, and deleted
    by ``stop()``.
    """

    _copied_install: Path | None = field(default=None, init=False)

    def _init_and_start(self) -> None:
        user = _service_user()
        if user is not None and _run_as(user, [str(self.bin_dir / "postgres"), "--version"]).returncode != 0:
            self._copied_install = Path(tempfile.mkdtemp(prefix="marketplace-pgvector-bin-"))
            os.chmod(self._copied_install, 0o755)
            # The same layout as in site-packages: the binaries find their vendored libraries (libpq) through
            # the relative RPATH $ORIGIN/../../../pgserver.libs.
            package = self.bin_dir.parent.parent
            shutil.copytree(package / "pginstall", self._copied_install / "pgserver" / "pginstall", symlinks=True)
            vendored = package.parent / "pgserver.libs"
            if vendored.is_dir():
                shutil.copytree(vendored, self._copied_install / "pgserver.libs", symlinks=True)
            self.bin_dir = self._copied_install / "pgserver" / "pginstall" / "bin"
        super()._init_and_start()
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname="template1")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                # In template1, so that every database created afterwards has it.
                cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg2.Error as exc:
            raise ServiceError(f"PostgreSQL from {self.bin_dir} cannot create the vector extension: {exc}") from exc
        finally:
            conn.close()

    def stop(self) -> None:
        super().stop()
        if self._copied_install is not None:
            shutil.rmtree(self._copied_install, ignore_errors=True)
            self._copied_install = None


@dataclass
class MotoS3Server:
    """``python -m moto.server`` on 127.0.0.1:``port``: a real HTTP S3 endpoint with in-memory state."""

    port: int = field(default_factory=free_port)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    # A file, not a pipe: werkzeug logs every request and a full pipe would block the server.
    _log: Path = field(default_factory=lambda: _temp_file("marketplace-moto-", ".log"))

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3Server:
        """Start the server and wait until it answers HTTP."""
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                error = ServiceError(f"moto server on port {self.port} exited with {self._process.returncode}:\n"
                                     f"{self._log.read_text(errors='replace')}")
                self.stop()
                raise error
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise ServiceError(f"moto server on port {self.port} did not answer within {_START_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        """Terminate the server process (kill it if it does not exit promptly)."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._log.unlink(missing_ok=True)

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
