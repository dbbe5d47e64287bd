# CPU serving image of marketplace_reco: the HTTP service on port 8008, as a non-root user.
#
#   docker build -t marketplace-reco .
#   docker run -p 8008:8008 -v "$PWD/api_keys:/run/secrets/api_keys:ro" marketplace-reco
#
# It listens on 0.0.0.0, so it wants API keys: one per line in /run/secrets/api_keys (a Compose or Swarm secret of
# that name works as is), readable by uid 10001; it does not start without them. Clients send one as
# "Authorization: Bearer <key>" or "X-API-Key: <key>"; /health and /ready stay open. -e MARKETPLACE_API_KEYS_FILE=
# (empty) serves without keys, for a container only trusted hosts can reach.
#
# Models: checkpoints in ./checkpoints (image-classifier, text-cnn, fusion, as the training scripts name them)
# are baked in under /models; or name others at start, e.g. -e MARKETPLACE_IMAGE_MODEL=user/repo or s3://bucket/name.
# Without a registry or PyPI, see scripts/docker_smoke.sh: it builds from a local base image and local wheels.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# torch and torchvision come from PyTorch's CPU-only index, so the image carries no CUDA libraries.
# The versions default to those pinned in requirements/constraints.txt.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
# Read by pip itself: another package index, an extra index, a URL or folder of wheels (unset: PyPI only),
# and hosts to reach without certificate checks (only behind a TLS-intercepting proxy the image cannot trust).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, from the files that pin them only, so code changes do not reinstall torch.
COPY requirements/constraints.txt setup.cfg ./
# The CUDA-only pins (nvidia-*, cuda-*, triton) belong to the GPU build of torch that this image does not use.
RUN python3 -m venv /opt/venv \
    && grep -viE '^(torch|torchvision|triton|nvidia-|cuda-)[=<>~ ]' constraints.txt > /tmp/constraints-cpu.txt \
    && /opt/venv/bin/pip install --index-url "$TORCH_INDEX_URL" \
        "torch==${TORCH_VERSION:-$(sed -n 's/^torch==//p' constraints.txt)}" \
        "torchvision==${TORCHVISION_VERSION:-$(sed -n 's/^torchvision==//p' constraints.txt)}" \
    && /opt/venv/bin/python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); print(c['options']['install_requires'])" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --constraint /tmp/constraints-cpu.txt --requirement /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY marketplace_reco ./marketplace_reco
RUN /opt/venv/bin/pip install --no-deps .

FROM ${BASE_IMAGE}
ARG CHECKPOINTS_DIR=checkpoints
# DL3064 takes MARKETPLACE_API_KEYS_FILE for a secret: it is where the keys are, not a key.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MARKETPLACE_HOST=0.0.0.0 \
    MARKETPLACE_PORT=8008 \
    MARKETPLACE_CHECKPOINTS=/models \
    MARKETPLACE_IMAGE_MODEL=image-classifier \
    MARKETPLACE_TEXT_MODEL=text-cnn \
    MARKETPLACE_COMBINED_MODEL=fusion \
    MARKETPLACE_API_KEYS_FILE=/run/secrets/api_keys
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --shell /usr/sbin/nologin app
WORKDIR /home/app
EXPOSE 8008
# Healthy once every model is loaded and warmed up (/ready); loading large checkpoints takes a while.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['MARKETPLACE_PORT'] + '/ready', timeout=4)"]
CMD ["python", "-m", "marketplace_reco.serving"]
# Root-owned and world-readable: the app can read its models and code, not change them (checkpoint weights
# may have been written 0600 under a strict umask on the build host).
COPY ${CHECKPOINTS_DIR}/ /models/
RUN chmod -R a+rX /models
USER 10001:10001
# The largest layer last: with the vfs storage driver every later instruction would copy it again.
COPY --from=build /opt/venv /opt/venv
