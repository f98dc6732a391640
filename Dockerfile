# syntax=docker/dockerfile:1
# sftjob trainer image: `docker build -t sftjob .`; the chart runs it as uid 10001 with a read-only root.
#
# One CUDA stack, chosen on purpose: the base is a plain OS (no CUDA in it) and the CUDA libraries come only
# from the pinned wheels torch depends on. TORCH_CUDA picks the build:
#   cu130 (default)  torch 2.13.0 from PyPI, CUDA 13.0 wheels: needs an NVIDIA driver R580 or newer.
#   cu126            torch 2.13.0+cu126 from download.pytorch.org, CUDA 12.6 wheels: drivers R525+ (R535/R550/R570).
#     docker build --build-arg TORCH_CUDA=cu126 -t sftjob:cu126 .
# Dependencies: requirements.lock (runtime) + requirements-cuda13.lock or requirements-cuda12.lock, in the same
# order as `make setup` (tests/test_dockerfile.py); never the dev lockfile.
# Base: Ubuntu 24.04 (Python 3.12, what tests/test_image_pins.py resolves the pins for), pinned by digest.
# The digest was not pulled from a registry here (none is reachable): re-pin it with
#   docker buildx imagetools inspect ubuntu:24.04 --format '{{json .Manifest.Digest}}'

FROM ubuntu:24.04@sha256:d1e2e92c075e5ca139d51a140fff46f84315c0fdce203eab2807c7e495eff4f9 AS base

# ---- deps: a venv with the locked dependency tree and DeepSpeed's cpu_adam op compiled (needs a compiler) --
FROM base AS deps
ARG TORCH_CUDA=cu130
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base digest pins the distro snapshot; apt versions follow its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY requirements.lock requirements-cuda13.lock requirements-cuda12.lock ./
# torch first (the variant's CUDA build, with its CUDA pins), then the lockfile. DeepSpeed compiles only cpu_adam
# (distributed.offload_optimizer); DS_ACCELERATOR=cuda records the op for the CUDA accelerator the pods run
# (no GPU is visible at build time). The op is pure C++ (no nvcc).
RUN case "$TORCH_CUDA" in \
      cu130) lock=requirements-cuda13.lock ;; \
      cu126) lock=requirements-cuda12.lock ;; \
      *) echo "TORCH_CUDA must be cu130 or cu126, not '$TORCH_CUDA'" >&2; exit 1 ;; \
    esac \
 && /opt/venv/bin/pip install -c requirements.lock "$(grep -E '^torch==' requirements.lock)" -r "$lock" \
 && DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_ACCELERATOR=cuda \
    /opt/venv/bin/pip install --no-build-isolation -r requirements.lock -r "$lock" \
 && DS_ACCELERATOR=cuda /opt/venv/bin/python -c "from deepspeed.git_version_info import installed_ops as o; assert o['cpu_adam'], o"

# ---- wheel: the sftjob package itself (version from job/__init__.py, package data included) --------------
FROM deps AS wheel
COPY pyproject.toml README.md ./
COPY job/ ./job/
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation -w /dist .

# ---- runtime: base + venv + the installed wheel (last layer); no compiler ---------------------------------
FROM base AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG TORCH_CUDA=cu130
LABEL org.opencontainers.image.title="sftjob" \
      org.opencontainers.image.description="Supervised fine-tuning of chat models as a Kubernetes batch job" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/sftjob/sftjob" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="ubuntu:24.04" \
      ai.sftjob.torch-cuda="${TORCH_CUDA}"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sftjob \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/sftjob --shell /usr/sbin/nologin sftjob \
 && install -d -o 10001 -g 10001 /var/cache/sftjob
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sftjob \
    SFTJOB_CACHE_DIR=/var/cache/sftjob \
    HF_HUB_DISABLE_TELEMETRY=1
COPY --from=wheel /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-deps --no-index --no-cache-dir /tmp/dist/sftjob-*.whl \
 && rm -rf /tmp/dist \
 && sftjob --version
USER 10001:10001
# A batch job: Kubernetes watches the exit code (see the chart's podFailurePolicy), not a probe.
HEALTHCHECK NONE
ENTRYPOINT ["sftjob"]
CMD ["--help"]
