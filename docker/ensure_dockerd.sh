#!/usr/bin/env bash
# Make a local Docker engine usable on a machine without one: install docker.io if missing and start
# dockerd with the vfs storage driver and no networking of its own (containers and builds use --network host),
# which is what works inside an unprivileged build machine without overlayfs or iptables.
set -euo pipefail

log=${DOCKERD_LOG:-/tmp/dockerd.log}

if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker.io
fi
echo "starting dockerd (log: $log)" >&2
nohup dockerd --storage-driver=vfs --iptables=false --bridge=none >"$log" 2>&1 &
for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 1
done
echo "dockerd did not come up within 60 s; see $log" >&2
exit 1
