# syntax=docker/dockerfile:1
# GPU image for `segment`: docker build -t segment .   (see docs/docker.md)
#
# Base: the official PyTorch runtime image, pinned by digest (the tag is only for people; the digest is what is
# pulled, so a re-pushed tag cannot change the image). It already carries a CUDA build of torch, cuDNN and NCCL;
# the host only needs the NVIDIA driver and the NVIDIA Container Toolkit (`docker run --gpus all`).
# CUDA 12.8 needs driver >= 525 (minor-version compatibility; >= 570 for full 12.8 support). For an older
# driver or a local mirror, pass another base, e.g. --build-arg BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.6-cudnn9-runtime@sha256:...
# or --build-arg BASE_IMAGE=registry.hospital.local/pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime@sha256:...
# How to look up or refresh the digest: docs/docker.md, "Pinned base image and dependencies".
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime@sha256:417bd75df6365104c283ea4c1651fb3530d9eb5a4c2fafa51943cff2a94e6385

# ---- stage 1: build a wheel, so no source tree or build tooling ends up in the final image ----
FROM ${BASE_IMAGE} AS wheel
WORKDIR /src
# .dockerignore trims the context to pyproject.toml, README.md, constraints.txt and segment/ (with segment/configs/).
COPY . .
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- stage 2: runtime ----
FROM ${BASE_IMAGE}

# IDs of the built-in user; run with --user "$(id -u):$(id -g)" to write files owned by you instead.
ARG SEGMENT_UID=10001
ARG SEGMENT_GID=10001

# Everything written outside /data, /models and /outputs goes under /tmp: HOME, the caches, matplotlib's config and
# SEGMENT_HOME (the demo dataset). So the image runs with a read-only root filesystem (`docker run --read-only
# --tmpfs /tmp`), and under an arbitrary --user uid that has no home or /etc/passwd entry.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    SEGMENT_HOME=/tmp/segment \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache

# Install the package WITHOUT replacing the base image's CUDA torch: pip would otherwise be free to
# "upgrade" torch to a newer CPU/CUDA wheel from PyPI (several GB, possibly the wrong CUDA). The
# constraint file pins torch to exactly the version already installed, so pip keeps it and picks
# monai/lightning releases compatible with it (or fails loudly); the check after it proves CUDA torch survived.
# constraints.txt pins every other dependency to the versions the tests passed with, so a rebuild is reproducible.
# The shipped configs are package data (segment/configs/); /opt/segment/configs is a stable path to them:
# `--config /opt/segment/configs/gpu.yaml`.
COPY --from=wheel /wheels /tmp/wheels
COPY constraints.txt /tmp/constraints.txt
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
 && python -m pip install --no-cache-dir --constraint /tmp/torch-constraint.txt --constraint /tmp/constraints.txt /tmp/wheels/segment-*.whl \
 && python -c "import sys, torch; c = open('/tmp/torch-constraint.txt').read().split('==')[1].strip(); sys.exit(0 if torch.__version__ == c else 'torch was replaced')" \
 && mkdir -p /opt/segment \
 && ln -s "$(python -c 'from segment.config import packaged_config_dir; print(packaged_config_dir())')" /opt/segment/configs \
 && test -f /opt/segment/configs/gpu.yaml \
 && rm -rf /tmp/wheels /tmp/torch-constraint.txt /tmp/constraints.txt

# Non-root user; the three mount points belong to it so the anonymous volumes are writable too.
# Its home is /tmp (see HOME above): nothing in the image itself needs to be writable.
RUN groupadd --gid "${SEGMENT_GID}" segment \
 && useradd --no-log-init --no-create-home --home-dir /tmp --uid "${SEGMENT_UID}" --gid "${SEGMENT_GID}" segment \
 && mkdir -p /data /models /outputs \
 && chown -R "${SEGMENT_UID}:${SEGMENT_GID}" /data /models /outputs \
 && chmod -R g+rwX /data /models /outputs

# /data: scans and labels (read-only is fine); /models: trained runs/checkpoints; /outputs: new runs and predictions.
VOLUME ["/data", "/models", "/outputs"]
# Relative paths such as the default `runs/NAME` land in the mounted /outputs.
WORKDIR /outputs
# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER ${SEGMENT_UID}:${SEGMENT_GID}

# No HEALTHCHECK: this is a run-to-completion CLI, not a service; its exit code is the health signal.
ENTRYPOINT ["segment"]
CMD ["--help"]
