#!/usr/bin/env bash
# Build a minimal Debian bookworm image with Python 3.11 and venv, without any registry: debootstrap a root
# filesystem from the Debian mirror this machine's apt already uses, then `docker import` it.
# The serving Dockerfile defaults to python:3.11-slim; where no registry is reachable, pass
#   --build-arg BASE_IMAGE=marketplace-reco-base:bookworm
# Usage: scripts/build_base_image.sh [tag]      (env: DEBIAN_MIRROR overrides the mirror)
set -euo pipefail

tag=${1:-marketplace-reco-base:bookworm}
here=$(cd "$(dirname "$0")/.." && pwd)

"$here/docker/ensure_dockerd.sh"
if ! command -v debootstrap >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
fi

# The first Debian archive URI configured for apt (deb822 or one-line format); deb.debian.org otherwise.
detect_mirror() {
    cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian/?( |$)' | sed -n '1{s/ //g;p}' || true
}
mirror=${DEBIAN_MIRROR:-$(detect_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d /tmp/marketplace-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap bookworm from $mirror into $rootfs" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror"

# Nothing below is needed at run time; dropping it keeps the base small.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
       "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log

# mktemp made the folder 0700, and it becomes the image's "/": non-root users could not even reach /bin.
chmod 0755 "$rootfs"
tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$tag"
docker image ls "$tag"
