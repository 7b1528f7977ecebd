# foldserve's CPU serving image: onnxruntime, numpy, foldserve's HTTP server (httptools, uvloop), FastAPI and the shipped models; no torch.
#   docker build -t foldserve:0.1.0 .
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp foldserve:0.1.0
# Your own store instead of the shipped one: -v /path/to/store:/srv/model_store:ro
# The GPU variant is docker/Dockerfile.gpu. No Docker engine runs in this project's CI:
# tests/deploy/test_image_recipe.py performs these steps in a virtual environment and runs the
# entrypoint as the image would (non-root, read-only root, PID 1), so keep every step one it can
# read: WORKDIR, COPY, ENV, USER, exec-form ENTRYPOINT, and RUN only in the build stage.

FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.lock docker/
COPY service ./service
COPY foldserve ./foldserve
# The lock pins every distribution (docker/update-lock writes it); `pip check` proves the pinned
# set consistent and the last line that torch stayed out.
RUN python -m venv /opt/foldserve \
 && /opt/foldserve/bin/pip install --no-cache-dir --constraint docker/requirements.lock . \
 && /opt/foldserve/bin/pip check \
 && ! /opt/foldserve/bin/python -c "import torch" 2>/dev/null

FROM python:3.11.13-slim-bookworm
COPY --from=build /opt/foldserve /opt/foldserve
COPY docker/healthcheck.py /opt/foldserve/healthcheck.py
# Owned by root: the server (uid 10001) reads its models and can never change them. Mount another
# store over this path, or point FOLDSERVE_MODEL_STORE elsewhere (KServe: /mnt/models).
COPY model_store /srv/model_store
# PYTHONDONTWRITEBYTECODE: the root filesystem may be read-only (pip compiled the bytecode already).
ENV PATH=/opt/foldserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FOLDSERVE_HOST=0.0.0.0 \
    FOLDSERVE_PORT=8000 \
    FOLDSERVE_MODEL_STORE=/srv/model_store \
    ORT_DISABLE_TELEMETRY=1
# Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd entry; the server needs none.
USER 10001:10001
WORKDIR /srv
EXPOSE 8000 8001
# Readiness, not liveness: the container is healthy once the default model is verified.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "/opt/foldserve/healthcheck.py"]
# Exec form: foldserve is PID 1 and gets SIGTERM itself; it stops accepting, answers every request
# it accepted, drains the batchers and exits 0 (each worker does, with FOLDSERVE_WORKERS; those
# pool their metrics under /tmp, hence --tmpfs /tmp with --read-only).
STOPSIGNAL SIGTERM
ENTRYPOINT ["foldserve", "serve"]
