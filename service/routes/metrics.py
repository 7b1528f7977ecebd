"""``/metrics`` in the Prometheus text format (the whole server's, with ``--workers``); open
unless ``metrics_require_key``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from service.routes.access import metrics_key

router = APIRouter()


@router.get(
    "/metrics",
    dependencies=[Depends(metrics_key)],
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    prometheus: CollectorRegistry = request.app.state.prometheus
    return Response(generate_latest(prometheus), media_type=CONTENT_TYPE_LATEST)
