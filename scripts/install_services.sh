#!/usr/bin/env bash
# Install the services the test suite starts for itself: a PostgreSQL server (Debian `postgresql`).
# Idempotent: does nothing when initdb is already on PATH or under /usr/lib/postgresql/*/bin.
# The S3 endpoint needs no system package: the tests run `python -m moto.server` from the virtualenv.
# Nor does PostgreSQL with pgvector (Debian's PostgreSQL 15 has no pgvector package): its binaries come from the
# PyPI package pgserver of the dev extra, and tests/services.py runs them as the account installed here (postgres).
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "PostgreSQL server binaries already installed; nothing to do."
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no initdb found and no apt-get to install Debian's postgresql package; install a PostgreSQL server by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# The server binaries only: the tests create and start their own cluster on a loopback port.
$SUDO apt-get install -y -q --no-install-recommends postgresql
echo "Installed: $(compgen -G '/usr/lib/postgresql/*/bin/initdb' | head -n 1)"
