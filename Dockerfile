# syntax=docker/dockerfile:1
# sftjob trainer image: `docker build -t sftjob .`; the chart runs it as uid 10001 with a read-only root.
# Dependencies come from requirements.lock exactly as `make setup` installs them (tests/test_dockerfile.py).

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04@sha256:8aef630a54bc5c5146ae5ce68e6af5caa3df0fb690bb91544175c91f307e4356 AS base

# ---- deps: a venv with the locked dependency tree (rebuilt only when the lockfile changes) ----------
FROM base AS deps
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base digest pins the distro snapshot; apt versions follow its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY requirements.lock requirements-cuda.lock ./
# Same order as `make setup`: torch first, then the lockfile with DeepSpeed's ops left to JIT; plus the
# GPU-only pins (bitsandbytes for QLoRA) that the CPU venv leaves out.
RUN /opt/venv/bin/pip install "$(grep -E '^torch==' requirements.lock)" \
 && DS_BUILD_OPS=0 /opt/venv/bin/pip install --no-build-isolation -r requirements.lock -r requirements-cuda.lock

# ---- runtime: base + venv + app code (last layer) ----------------------------------------------------
FROM base AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="sftjob" \
      org.opencontainers.image.description="Supervised fine-tuning of chat models as a Kubernetes batch job" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/sftjob/sftjob" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sftjob \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/sftjob --shell /usr/sbin/nologin sftjob
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sftjob \
    SFTJOB_CACHE_DIR=/var/cache/sftjob \
    HF_HUB_DISABLE_TELEMETRY=1
# The console script `make setup` gets from pyproject's [project.scripts], without an install step.
RUN printf '#!/opt/venv/bin/python\nimport sys\nfrom job.cli import main\nsys.exit(main())\n' > /opt/venv/bin/sftjob \
 && chmod 0755 /opt/venv/bin/sftjob \
 && install -d -o 10001 -g 10001 /var/cache/sftjob
WORKDIR /app
COPY job/ /app/job/
USER 10001:10001
# A batch job: Kubernetes watches the exit code (see the chart's podFailurePolicy), not a probe.
HEALTHCHECK NONE
ENTRYPOINT ["sftjob"]
CMD ["--help"]
