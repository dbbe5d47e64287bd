#!/usr/bin/env bash
# Docker smoke test, run here: build the serving image, start it with an API key, check /ready and one prediction
# per endpoint with the key, and a 401 without it.
#
# Here means: no registry (the base image is built locally by scripts/build_base_image.sh), no Docker engine
# (docker/ensure_dockerd.sh starts one: vfs storage, no bridge; builds and containers use --network host),
# and PyTorch's CPU index unreachable. torch and torchvision therefore come from the local package mirror
# (PyPI's builds, which bring CUDA libraries; the default build from the CPU index carries none), served to
# the build over loopback HTTP; everything else comes from PyPI, through this machine's TLS-intercepting
# proxy, whose certificate the image does not know (hence PIP_TRUSTED_HOST).
#
# Models: SMOKE_CHECKPOINTS (default: ./checkpoints) must hold image-classifier, text-cnn and fusion; if it
# does not, tiny ones are trained on the embedded sample marketplace into a temporary folder first.
# They are mounted over the image's /models.
#
# Usage: scripts/docker_smoke.sh
#   env: SMOKE_IMAGE, SMOKE_BASE_IMAGE, SMOKE_CHECKPOINTS, SMOKE_PACKAGE_ROOT, SMOKE_INDEX_PORT (default 18111)
# The image is kept afterwards (its layers are the next build's cache).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
image=${SMOKE_IMAGE:-marketplace-reco:smoke}
base_image=${SMOKE_BASE_IMAGE:-marketplace-reco-base:bookworm}
# The local mirror: <root>/pypi-more/simple (torch, torchvision, nvidia-*) and <root>/pypi/simple.
package_root=${SMOKE_PACKAGE_ROOT:-/opt}
python=${PYTHON:-$here/.venv/bin/python}
container=marketplace-reco-smoke-$$
workdir=$(mktemp -d /tmp/marketplace-smoke.XXXXXX)
index_pid=

cleanup() {
    docker rm -f "$container" >/dev/null 2>&1 || true
    if [ -n "$index_pid" ]; then kill "$index_pid" 2>/dev/null || true; fi
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }
has_models() {
    for name in image-classifier text-cnn fusion; do [ -f "$1/$name/config.json" ] || return 1; done
}
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

step "docker engine and base image"
"$here/docker/ensure_dockerd.sh"
docker image inspect "$base_image" >/dev/null 2>&1 || "$here/scripts/build_base_image.sh" "$base_image"
# The 28.x client would ask for buildx; the engine's classic builder is all that is needed here.
export DOCKER_BUILDKIT=0

step "checkpoints"
checkpoints=${SMOKE_CHECKPOINTS:-$here/checkpoints}
if ! has_models "$checkpoints"; then
    checkpoints=$workdir/checkpoints
    echo "training tiny models on the embedded sample into $checkpoints"
    export MARKETPLACE_CHECKPOINTS=$checkpoints
    if [ ! -e "$here/data/marketplace.db" ]; then
        (cd "$here" && "$python" scripts/make_sample_data.py --no-progress)
    fi
    (cd "$here" \
        && "$python" scripts/train_word2vec.py --plot-method pca --epochs 2 \
        && "$python" scripts/train_text_cnn.py --epochs 2 \
        && "$python" scripts/train_image.py --no-pretrained --backbone resnet10t --image-size 64 --epochs 1 \
        && "$python" scripts/train_combined.py --epochs 2) >"$workdir/train.log" 2>&1 \
        || { tail -n 30 "$workdir/train.log"; exit 1; }
fi
# The container runs as uid 10001: give it a readable copy (a strict umask may have written the checkpoints 0600).
cp -r "$checkpoints" "$workdir/models"
chmod -R a+rX "$workdir/models"
ls "$workdir/models"

step "build $image (local package mirror on loopback)"
# A fixed port: the build arguments carry the index URL, and a new URL would defeat the layer cache.
index_port=${SMOKE_INDEX_PORT:-18111}
"$python" -m http.server --bind 127.0.0.1 --directory "$package_root" "$index_port" >"$workdir/index.log" 2>&1 &
index_pid=$!
index=http://127.0.0.1:$index_port
started=$SECONDS
docker build --network host \
    --build-arg BASE_IMAGE="$base_image" \
    --build-arg TORCH_INDEX_URL="$index/pypi-more/simple" \
    --build-arg PIP_EXTRA_INDEX_URL="$index/pypi/simple https://pypi.org/simple" \
    --build-arg PIP_TRUSTED_HOST="pypi.org files.pythonhosted.org" \
    -t "$image" "$here" >"$workdir/build.log" 2>&1 || { tail -n 40 "$workdir/build.log"; exit 1; }
echo "built in $((SECONDS - started)) s"

step "run (with an API key, as the image wants)"
port=$(free_port)
"$python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$workdir/api_keys"
chmod a+r "$workdir/api_keys"
api_key=$(head -n 1 "$workdir/api_keys")
docker run -d --name "$container" --network host \
    -e MARKETPLACE_HOST=127.0.0.1 -e MARKETPLACE_PORT="$port" \
    -v "$workdir/api_keys:/run/secrets/api_keys:ro" \
    -v "$workdir/models:/models:ro" "$image" >/dev/null
url=http://127.0.0.1:$port
for _ in $(seq 300); do
    if curl -fsS "$url/ready" >/dev/null 2>&1; then break; fi
    if [ "$(docker inspect -f '{{.State.Running}}' "$container")" != true ]; then
        docker logs "$container" | tail -n 40; echo "the container stopped" >&2; exit 1
    fi
    sleep 1
done
echo "GET /ready -> $(curl -sS -w ' (%{http_code})' "$url/ready")"
echo "user in the container: $(docker exec "$container" id -u):$(docker exec "$container" id -g)"

step "one prediction of each kind"
"$python" - "$workdir/photo.jpg" <<'EOF'
import sys
from PIL import Image, ImageDraw

photo = Image.new("RGB", (320, 240), (235, 235, 230))
ImageDraw.Draw(photo).rectangle((60, 80, 260, 200), fill=(90, 60, 40))
photo.save(sys.argv[1], "JPEG")
EOF
cat >"$workdir/show.py" <<'EOF'
import json
import sys

endpoint, answer = sys.argv[1], json.loads(sys.argv[2])
assert answer["pred"] == answer["classes"][0] and len(answer["classes"]) == len(answer["probabilities"]), answer
p = answer["probabilities"][answer["pred"]]
print(f"POST /{endpoint}: pred={answer['pred']!r} p={p:.3f} model={answer['model']} revision={answer['revision']}")
EOF
check() {  # endpoint, then curl arguments: print the answer; fail unless it is a prediction
    local endpoint=$1
    shift
    "$python" "$workdir/show.py" "$endpoint" "$(curl -sS -f -H "X-API-Key: $api_key" "$@" "$url/$endpoint")"
}
check image -F "image=@$workdir/photo.jpg"
check text -H 'Content-Type: application/json' -d '{"text": "Solid oak dining table with four chairs"}'
check combined -F "img=@$workdir/photo.jpg" -F "txt=Solid oak dining table with four chairs"
without_key=$(curl -sS -o /dev/null -w '%{http_code}' -F "image=@$workdir/photo.jpg" "$url/image")
echo "POST /image without the key -> $without_key"
[ "$without_key" = 401 ]

step "health check"
for _ in $(seq 90); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
    if [ "$health" != starting ]; then break; fi
    sleep 1
done
echo "docker health status: $health"
[ "$health" = healthy ]

step "image"
docker image ls "$image"
echo "size: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}')"
# In the running container: with vfs, a new container would first copy the whole image.
echo "of which CUDA-only packages (this mirror's torch build; none from the CPU index):"
docker exec "$container" sh -c 'du -sh /opt/venv/lib/python3*/site-packages/nvidia /opt/venv/lib/python3*/site-packages/triton'
echo "smoke test passed"
