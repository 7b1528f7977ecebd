"""Triton's statistics extension: ``GET /v2/models/stats``, ``/v2/models/{m}/stats`` and
``/v2/models/{m}/versions/{v}/stats``.

NOTE: ``/v2/models/stats`` is also what model metadata would be for a model named "stats"; as in
Triton, statistics win. The app includes this router before the V2 one, so that it matches first.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response

from service.routes.models import registry_of
from service.routes.paths import v2_path_version
from service.schemas import ModelStatsAnswer, documented
from service.stats import model_stats as stats_document

router = APIRouter(prefix="/v2/models")


@router.get("/stats", responses=documented(ModelStatsAnswer))
async def all_stats(request: Request) -> Response:
    return _answer(request, None, None)


@router.get("/{name}/stats", responses=documented(ModelStatsAnswer, 404))
@router.get("/{name}/versions/{version}/stats", responses=documented(ModelStatsAnswer, 404))
async def model_stats(request: Request, name: str, version: str | None = None) -> Response:
    return _answer(request, name, v2_path_version(name, version))


def _answer(request: Request, name: str | None, version: int | None) -> Response:
    document = stats_document(registry_of(request), request.app.state.telemetry, name, version)
    return Response(orjson.dumps(document), media_type="application/json")
