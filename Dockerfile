# loraserve image. No container engine runs on the development machine, so this file is not built
# in CI; every install step it runs is scripts/install.sh, which `make test` runs on each CI run.
#   CPU:  docker build -t loraserve:cpu .
#   CUDA: docker build --build-arg VARIANT=cuda -t loraserve:cuda .
ARG VARIANT=cpu

FROM python:3.11-slim AS base-cpu
# PyTorch's CPU wheels: the default PyPI build of torch bundles CUDA (several GB).
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# g++: the one-stream decode step is C++ that inductor writes and builds on a first start
# (server/engine/compiled_step.py), and int8, q4_1 and bf16 bases build our row kernels (adapters/native.py);
# without a compiler the server decodes eagerly, on aten's int8 kernels, and refuses q4_1.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# PyPI's default torch build is the CUDA one.
ENV TORCH_INDEX_URL=

FROM base-${VARIANT}
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    LORASERVE_CACHE_DIR=/opt/loraserve/cache
RUN useradd --create-home --uid 10001 loraserve
WORKDIR /opt/loraserve/src
COPY pyproject.toml constraints.txt README.md ./
COPY scripts ./scripts
COPY adapters ./adapters
COPY server ./server
COPY client ./client
# Installs torch, loraserve and the default model, and converts the model into the cache,
# so the default model is there without network at run time.
RUN python3 -m venv /opt/venv \
 && PYTHON=/opt/venv/bin/python scripts/install.sh \
 && chmod -R a+rX /opt/loraserve \
 && chown -R loraserve:loraserve /opt/loraserve/cache
# The cache is the server's own: kernel plans, the compiled step's verdict and code persist there.

# Settings come from LORASERVE_* variables (see `loraserve serve --help`).
ENV LORASERVE_HOST=0.0.0.0 \
    LORASERVE_PORT=8000 \
    LORASERVE_ADAPTER_STORE=/data/adapters
RUN mkdir -p /data/adapters && chown loraserve:loraserve /data/adapters
VOLUME /data/adapters
USER loraserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LORASERVE_PORT', '8000') + '/health', timeout=4)"]
# SIGTERM: stop accepting, finish in-flight requests for up to LORASERVE_SHUTDOWN_TIMEOUT, exit 0.
STOPSIGNAL SIGTERM
CMD ["loraserve", "serve"]
