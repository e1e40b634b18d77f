# syntax=docker/dockerfile:1
# mlfabric node image: a builder stage makes a virtual environment (torch + the mlfabric wheel), the
# runtime stage is python slim with only that environment, running as an unprivileged user.
#
#   docker build -t mlfabric:0.1.0 .                                   # CPU torch
#   docker build -t mlfabric:0.1.0-cu128 --build-arg TORCH_VARIANT=cu128 .
#   docker build -t mlfabric:0.1.0-notorch --build-arg TORCH_VARIANT=none .   # control plane only
#   docker run -d --name mlf0 -p 7700:7700 -e MLFABRIC_ADVERTISE=HOST:7700 -v mlf0:/var/lib/mlfabric mlfabric:0.1.0
#
# TORCH_VARIANT names an index under https://download.pytorch.org/whl/ (cpu, or a CUDA build that is
# published for torch==TORCH_VERSION: check the index, e.g. cu126, cu128). CUDA images need the NVIDIA
# container toolkit on the host (docker run --gpus all ...); the driver comes from the host.
# Configuration is environment only (MLFABRIC_<FIELD>, nested fields with "__", e.g.
# MLFABRIC_OVERLAY__STABILIZE_INTERVAL=0.5, lists as JSON: MLFABRIC_SEEDS='["seed:7700"]'); see README.md.
# There is no Docker engine on the project's CI machines: this file is linted with hadolint there
# (tests/unit/test_deploy_lint.py), not built.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/bash", "-eu", "-o", "pipefail", "-c"]

# torch first, from the variant's own index: a plain "torch" from PyPI would be the multi-GB CUDA build.
RUN python -m venv /opt/venv \
    && if [ "${TORCH_VARIANT}" != "none" ]; then \
         /opt/venv/bin/pip install --no-cache-dir \
           --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"; \
       fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mlfabric ./mlfabric
# Build the wheel, then install it (not the source tree) with its pinned-by-range dependencies.
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir /tmp/wheels/mlfabric-*.whl \
    && /opt/venv/bin/mlfabric --version

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="mlfabric" \
      org.opencontainers.image.description="Peer-to-peer daemon for training neural networks across many servers" \
      org.opencontainers.image.licenses="Apache-2.0"

# --no-log-init: no lastlog/faillog entry, which for a high uid would be a huge sparse file in the layer.
RUN useradd --system --no-log-init --uid 10001 --user-group \
      --home-dir /var/lib/mlfabric --create-home --shell /usr/sbin/nologin mlfabric \
    && chmod 0700 /var/lib/mlfabric

COPY --from=builder /opt/venv /opt/venv

# 7700: the node port (control lane and bulk lane share it). 7701: the control endpoint (/status,
# /lookup, Prometheus /metrics), bound to all interfaces here so the orchestrator can probe and scrape
# it; keep it off the public network.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFABRIC_LISTEN=0.0.0.0:7700 \
    MLFABRIC_CONTROL=0.0.0.0:7701 \
    MLFABRIC_DATA_DIR=/var/lib/mlfabric \
    MLFABRIC_LOG_FORMAT=json

USER 10001:10001
WORKDIR /var/lib/mlfabric
VOLUME ["/var/lib/mlfabric"]
EXPOSE 7700/tcp 7701/tcp

# `mlfabric status` finds the control endpoint in $MLFABRIC_DATA_DIR/control (the address the node
# bound), so it follows MLFABRIC_CONTROL when that is changed. It exits 1 when the node does not answer
# and 2 when no node has written that file yet; Docker reserves 2, hence "|| exit 1".
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/bin/sh", "-c", "mlfabric status --timeout 4 || exit 1"]

# SIGTERM (docker stop) makes the node leave the ring gracefully; give it `docker stop -t 30`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mlfabric"]
CMD ["node"]
