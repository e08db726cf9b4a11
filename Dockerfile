# syntax=docker/dockerfile:1
# One image, two roles (docs/DEPLOY.md):
#   the Streams service (default):  chatops serve --host 0.0.0.0 --port 8080
#   the Streamlit console:          streamlit run app.py --server.port 8501 --server.address 0.0.0.0
# fly.toml runs the first, fly.console.toml overrides the command with the second.
# tests/deploy/test_image.py replays this file's install and start steps in a fresh virtualenv.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the project and its runtime dependencies into a virtualenv -------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY . .
# A plain (non-editable) install of the project: runtime dependencies only, never the dev extra.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/venv/bin/pip install --no-cache-dir .

# --- runtime: the virtualenv and the console's page files, run by an unprivileged user -------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STREAMLIT_SERVER_HEADLESS=true \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false
RUN groupadd --system --gid 10001 chatops \
    && useradd --system --uid 10001 --gid chatops --create-home --home-dir /home/chatops chatops
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
# The console's entry script and pages are run from files (st.navigation loads pages by
# path), with its Streamlit config; its `console` package is already installed in the
# virtualenv with the service. Its secrets.toml (sign-in) is never copied: Fly writes it at
# boot (fly.console.toml [[files]]).
COPY app.py ./
COPY views ./views
COPY .streamlit/config.toml ./.streamlit/config.toml
# Writable only where a process needs it: the embedded SQLite default (./.data) for a local
# `docker run` without DATABASE_URL; Fly deployments always use Postgres.
RUN mkdir -p /app/.data && chown chatops:chatops /app/.data
USER chatops
EXPOSE 8080 8501
# Docker's own health probe (Fly uses the checks in fly*.toml). The console sets
# HEALTHCHECK_URL to Streamlit's http://127.0.0.1:8501/_stcore/health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:8080/health'), timeout=4)"]
CMD ["chatops", "serve", "--host", "0.0.0.0", "--port", "8080"]
