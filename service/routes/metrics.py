"""``/metrics`` in the Prometheus text format (the whole server's, with ``--workers``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.metrics import Metrics

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    app_metrics: Metrics = request.app.state.metrics
    return Response(app_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
