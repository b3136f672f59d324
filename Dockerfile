# syntax=docker/dockerfile:1
#
# One image for every specmesh role; the command picks it:
#   docker run IMAGE                 -> specmesh engine        (the default CMD)
#   docker run IMAGE sidecar         -> specmesh sidecar
#   docker run IMAGE control-plane   -> specmesh control-plane
#
# The builder installs exactly what uv.lock pins (`uv sync --locked`: the build fails if the
# lock is stale) into /app/.venv, the project itself as a regular (non-editable) wheel. The
# final stage holds the interpreter of the same base image, that venv and tini -- no uv, no
# compiler, no apt lists, no source tree. See docs/deploy.md ("The image").

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# uv, pinned to the version the lock was written with.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini (Debian 12 package, pinned): its static build is copied into the final stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_NO_CACHE=1

WORKDIR /src

# Dependencies first (their layer survives code changes): only the lock and the metadata.
# The `kubernetes` extra is the control plane's Kubernetes runtime (Helm's SDK, lightkube).
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-editable --extra kubernetes --no-install-project

# Then the project, installed as a wheel into the venv (entry points included).
COPY specmesh ./specmesh
COPY engine ./engine
COPY sidecar ./sidecar
COPY control_plane ./control_plane
COPY specmeshctl ./specmeshctl
RUN uv sync --locked --no-dev --no-editable --extra kubernetes \
    && /app/.venv/bin/specmesh --help > /dev/null \
    && /app/.venv/bin/python -c "import control_plane.runtime.kubernetes"

# The Helm chart: the control plane renders every agent from its templates
# (SPECMESH_CHART_PATH=/app/helm/specmesh, set by the chart).
COPY helm/specmesh ./helm/specmesh

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="specmesh" \
      org.opencontainers.image.description="specmesh engine, sidecar and control plane" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric, non-root user; its home and the runtime folders are the only writable paths
# (mount volumes there when the root filesystem is read-only).
RUN groupadd --system --gid 10001 specmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/specmesh --shell /usr/sbin/nologin specmesh \
    && mkdir -p /run/specmesh /var/lib/specmesh \
    && chown 10001:10001 /run/specmesh /var/lib/specmesh

COPY --from=builder /usr/bin/tini-static /usr/bin/tini
COPY --from=builder /app/.venv /app/.venv
COPY --from=builder /src/helm/specmesh /app/helm/specmesh

ENV PATH=/app/.venv/bin:$PATH \
    VIRTUAL_ENV=/app/.venv \
    HOME=/var/lib/specmesh \
    SPECMESH_HOME=/var/lib/specmesh \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    SPECMESH_HEALTHCHECK_URL=http://127.0.0.1:7103/readyz

WORKDIR /var/lib/specmesh
USER 10001:10001

# A2A HTTP/gRPC (sidecar inbound), sidecar ops, control plane HTTP/gRPC.
EXPOSE 8080 8081 9090 8090 8091

# For Docker/Compose only (Kubernetes ignores it; the chart sets its own probes). The role's
# health URL is SPECMESH_HEALTHCHECK_URL: the engine's /readyz by default; set it to
# http://127.0.0.1:9090/healthz for the sidecar, http://127.0.0.1:8090/healthz for the
# control plane.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-I", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open(os.environ['SPECMESH_HEALTHCHECK_URL'], timeout=3)"]

# tini is PID 1: it forwards SIGTERM/SIGINT to specmesh (which drains and exits) and reaps
# zombies.
ENTRYPOINT ["/usr/bin/tini", "--", "specmesh"]
CMD ["engine"]
