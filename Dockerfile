# syntax=docker/dockerfile:1.7
# Two targets (DESIGN 2.1):
#   docker build --target api    -t spasemsr-api .     slim, no torch
#   docker build --target worker -t spasemsr-worker .  CUDA runtime + the CUDA torch build

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 spasemsr
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY core ./core
COPY app ./app
COPY cli ./cli
# The API needs only the base dependencies; the model packages are never installed here.
RUN mkdir -p model worker && touch model/__init__.py worker/__init__.py \
    && pip install . && rm -rf model worker build
USER spasemsr
ENV SPASEMSR_API__HOST=0.0.0.0 SPASEMSR_API__PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["python", "-m", "app.server"]

FROM ${CUDA_IMAGE} AS worker
ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 spasemsr \
    && python3 -m venv /opt/venv
RUN pip install --index-url ${TORCH_INDEX} "torch==${TORCH_VERSION}"
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY core ./core
COPY model ./model
COPY worker ./worker
COPY app ./app
COPY cli ./cli
# nvidia-ml-py: GPU utilisation for the worker's /metrics (optional import, GPU images only).
RUN pip install ".[model]" "nvidia-ml-py==13.615.71"
USER spasemsr
# One worker process per GPU: the container sees the GPU(s) it was given.
ENV SPASEMSR_MODEL__DEVICE=cuda SPASEMSR_VAR_DIR=/home/spasemsr/var \
    SPASEMSR_WORKER__METRICS_HOST=0.0.0.0 SPASEMSR_WORKER__METRICS_PORT=9100
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "worker.healthcheck"]
CMD ["python", "-m", "worker"]
