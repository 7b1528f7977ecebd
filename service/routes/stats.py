"""Triton's statistics extension: ``GET /v2/models/stats``, ``/v2/models/{m}/stats`` and
``/v2/models/{m}/versions/{v}/stats``.

NOTE: ``/v2/models/stats`` is also what model metadata would be for a model named "stats"; as in
Triton, statistics win. The app includes this router before the V2 one, so that it matches first.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from fastapi import APIRouter, Request, Response

from service.errors import ModelNotFound
from service.routes.models import registry_of
from service.routes.paths import v2_path_version
from service.schemas import ModelStatsAnswer, documented
from service.stats import triton_entry
from service.telemetry import Telemetry
from service.versions import Status, VersionRecord

router = APIRouter(prefix="/v2/models")

# Versions that serve (or served, at shutdown); one loading or failed has nothing to count.
_COUNTED = (Status.READY, Status.STOPPED)


@router.get("/stats", responses=documented(ModelStatsAnswer))
async def all_stats(request: Request) -> Response:
    return _answer(request, registry_of(request).entries())


@router.get("/{name}/stats", responses=documented(ModelStatsAnswer, 404))
@router.get("/{name}/versions/{version}/stats", responses=documented(ModelStatsAnswer, 404))
async def model_stats(request: Request, name: str, version: str | None = None) -> Response:
    number = v2_path_version(name, version)
    versions = [e for e in registry_of(request).entries() if e.name == name]
    if not versions:
        raise ModelNotFound(f"model {name!r} not found")
    if number is not None:
        versions = [e for e in versions if e.version == number]
        if not versions:
            raise ModelNotFound(f"model {name!r} has no version {number}")
    return _answer(request, versions)


def _answer(request: Request, entries: Iterable[VersionRecord]) -> Response:
    # With --workers, every worker's figures (pooled); alone, this process's own.
    telemetry: Telemetry = request.app.state.telemetry
    readings = telemetry.read()
    stats = [
        triton_entry(e.name, e.version, readings.get((e.name, str(e.version))))
        for e in entries
        if e.status in _COUNTED
    ]
    return Response(orjson.dumps({"model_stats": stats}), media_type="application/json")
