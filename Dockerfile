# syntax=docker/dockerfile:1.7
# Two targets (DESIGN 2.1):
#   docker build --target api    -t spasemsr-api .     slim, no model dependencies
#   docker build --target worker -t spasemsr-worker .  CUDA, the model dependencies
# Each stage copies every package its entry points import (tests/deploy/test_images.py
# replays the COPY lines and imports them); hadolint runs on this file in the suite.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04

FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 spasemsr && useradd --create-home --uid 10001 --gid 10001 spasemsr
WORKDIR /srv
COPY pyproject.toml README.md constraints.txt ./
COPY core ./core
COPY app ./app
COPY cli ./cli
# The CLI reads the training config (plain dataclasses) for train's options; model/ is a stub.
COPY model/training/__init__.py model/training/config.py ./model/training/
# The Python client is its own distribution (client/pyproject.toml); the CLI imports it.
COPY client ./client
# The API needs only the base dependencies: the model and worker packages are empty stubs so
# that the package list of pyproject.toml resolves without their code or dependencies.
RUN mkdir -p model worker && touch model/__init__.py worker/__init__.py \
    && pip install -c constraints.txt ./client . && rm -rf model worker build client/build
# The name resolves in this image's /etc/passwd; Kubernetes sets runAsUser: 10001 itself.
# hadolint ignore=DL3066
USER spasemsr
ENV SPASEMSR_API__HOST=0.0.0.0 SPASEMSR_API__PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["python", "-m", "app.server"]

FROM ${CUDA_IMAGE} AS worker
# The CUDA of CUDA_IMAGE is the one TORCH_INDEX builds torch for (cu130 = CUDA 13.0, the CUDA
# that PyPI's torch 2.13.0 wheel also requires: cuda-toolkit 13.0.3). The wheel brings its own
# CUDA libraries and cuDNN as pip packages, so the slim `base` flavour suffices; the image's
# CUDA version still makes the NVIDIA runtime refuse a host whose driver is too old (>= 580).
# The release the suite runs (constraints.txt: its CPU build); the tests keep the two equal.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# The release of the pinned base image fixes these packages' versions; its archive keeps only
# the current build of each, so an exact apt pin would break the build at the next update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 spasemsr && useradd --create-home --uid 10001 --gid 10001 spasemsr \
    && install -d -o 10001 -g 10001 /home/spasemsr/var \
    && python3 -m venv /opt/venv
# Its own layer before the sources: the largest download is not repeated for a code change.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /srv
COPY pyproject.toml README.md constraints.txt ./
COPY core ./core
COPY model ./model
COPY worker ./worker
COPY app ./app
COPY cli ./cli
# Its own distribution, as in the API stage.
COPY client ./client
# The suite's pins, less its torch line (the CPU build): this image keeps the CUDA build of
# the same release installed above. `gpu`: NVML for the worker's GPU metrics.
RUN sed '/^torch==/d' constraints.txt > /tmp/constraints-image.txt \
    && pip install -c /tmp/constraints-image.txt ./client ".[model,gpu]" "torch==${TORCH_VERSION}" \
    && rm -rf build client/build /tmp/constraints-image.txt
# As in the API stage: uid 10001, resolved here; Kubernetes sets runAsUser: 10001 itself.
# hadolint ignore=DL3066
USER spasemsr
# SPASEMSR_VAR_DIR is created above, owned by that user: a named volume mounted there (compose)
# starts with that ownership instead of root's. One worker process per GPU: the container sees
# the GPU(s) it was given.
ENV SPASEMSR_MODEL__DEVICE=cuda SPASEMSR_VAR_DIR=/home/spasemsr/var \
    SPASEMSR_WORKER__METRICS_HOST=0.0.0.0 SPASEMSR_WORKER__METRICS_PORT=9100
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "worker.healthcheck"]
CMD ["python", "-m", "worker"]
