# syntax=docker/dockerfile:1
# cspine-triage, CPU image: one image for `triage scp`, `triage worker`, `triage web` and
# `triage db upgrade` (ONNX Runtime on the CPU; Dockerfile.gpu is the CUDA variant).
#
#   docker build -t cspine-triage .
#   docker run --rm cspine-triage --help
#
# The runtime image has no torch (training only) and runs as uid 10001 with a read-only
# root filesystem where the orchestrator allows it: writes go to /data (TRIAGE_DATA_DIR:
# spool and results, shared between components) and /tmp.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# tini is PID 1: it forwards SIGTERM to triage (a Python PID 1 ignores it) and reaps children.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
 && pip install "pip>=24.2,<26" "setuptools>=68,<81" "wheel>=0.43"

WORKDIR /app
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY deploy/docker/ deploy/docker/
RUN python deploy/docker/runtime-requirements.py pyproject.toml > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY alembic.ini ./
COPY alembic/ alembic/
COPY models/cspine-v1/ models/cspine-v1/
COPY service/ service/
# Editable install on purpose: service.db.migrate finds alembic/ next to the package
# (/app/alembic), which a site-packages install would not have.
RUN pip install --no-deps --no-build-isolation -e . \
 && python -m compileall -q service alembic deploy/docker \
 && python deploy/docker/verify-image.py --cpu --model-dir models/cspine-v1

RUN groupadd --system --gid 10001 triage \
 && useradd --system --uid 10001 --gid triage --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin triage \
 && install -d -o triage -g triage -m 0750 /data

ENV TRIAGE_DATA_DIR=/data \
    TRIAGE_MODEL_DIR=/app/models/cspine-v1 \
    TRIAGE_WEB_HOST=0.0.0.0 \
    TRIAGE_DICOM_HOST=0.0.0.0 \
    TRIAGE_EXECUTION_PROVIDERS=CPUExecutionProvider
USER 10001:10001
EXPOSE 8000 11112
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/app/deploy/docker/healthcheck.py"]
ENTRYPOINT ["tini", "--", "triage"]
CMD ["web"]
