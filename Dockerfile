# foldserve serving image: onnxruntime + numpy, no torch. Build from the repo root:
#   docker build -t foldserve .
#   docker run --rm -p 8000:8000 foldserve
# Mount another store with: -v /path/to/store:/srv/model_store:ro

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY foldserve ./foldserve
RUN python -m venv /opt/foldserve \
 && /opt/foldserve/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/foldserve/bin/pip install --no-cache-dir . \
 && ! /opt/foldserve/bin/python -c "import torch" 2>/dev/null

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /srv foldserve
COPY --from=build /opt/foldserve /opt/foldserve
COPY --chown=foldserve model_store /srv/model_store
COPY docker/healthcheck.py /opt/foldserve/healthcheck.py
ENV PATH=/opt/foldserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FOLDSERVE_HOST=0.0.0.0 \
    FOLDSERVE_PORT=8000 \
    FOLDSERVE_MODEL_STORE=/srv/model_store
USER foldserve
WORKDIR /srv
EXPOSE 8000
# Readiness, not liveness: the container is healthy once the default model is verified.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "/opt/foldserve/healthcheck.py"]
# SIGTERM makes uvicorn (each worker, with FOLDSERVE_WORKERS) stop accepting and drain the
# batchers before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["foldserve", "serve"]
