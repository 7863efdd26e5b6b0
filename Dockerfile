# One image for every ppm-stream process in infra/docker-compose.yml: `ppm topics`, the Faust
# worker, `ppm train --follow`, `ppm serve` (and `ppm publish`). Installs as infra/dev does:
# the lock file as is (--no-deps: no re-resolution), then the project itself, editable.
# tests/test_compose.py checks these installs and COPY sources against the repository (there
# is no Docker engine where this project is developed, so the image is not built there).
#
#   docker build -t ppm-stream:dev .          # or: docker compose -f infra/docker-compose.yml build
#
# PyPI's torch wheel brings CUDA libraries: the image is large (about 7 GB), as .venv is.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# Real product photos for the simulated shop (/usr/share/datasets/fashion-mnist).
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# The dependencies first, in their own layer: a code change does not reinstall them.
COPY requirements.lock pyproject.toml ./
RUN python -m pip install "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0" \
    && python -m pip install --no-deps -r requirements.lock

COPY README.md ./
COPY ppm ppm
COPY streams streams
COPY encoders encoders
COPY feature_repo feature_repo
COPY trainer trainer
RUN python -m pip install --no-deps --no-build-isolation -e .

# Not root; the shared data volume (PPM__DATA_DIR=/data) starts out owned by this user.
RUN useradd --create-home --uid 10001 ppm && mkdir /data && chown ppm:ppm /data
USER ppm
ENV PPM__DATA_DIR=/data

CMD ["ppm", "--help"]
