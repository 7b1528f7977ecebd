"""``GET /models/{name}/drift``: live inputs against the input BatchNorm's training statistics,
and the hidden BatchNorms' inputs (mapped from them) against theirs, under ``hidden``.

A model without an input BatchNorm answers 200 with ``available: false`` and the reason (the
model exists; it has no reference to compare with); an unknown model 404, a version not serving
503, as on the other model routes. See ``service.drift`` for the score.
"""

from __future__ import annotations

import dataclasses

import orjson
from fastapi import APIRouter, Query, Request, Response

from service.drift import MIN_SAMPLES
from service.registry import Registry
from service.schemas import DriftAnswer, documented

router = APIRouter()
SCORE = (
    "mean over features of |live mean - ref mean| / sqrt(ref var + floor) plus mean of "
    "|ln((live var + floor) / (ref var + floor))|, floor = max(eps, 0.01 * mean ref var)"
)


@router.get("/models/{name}/drift", responses=documented(DriftAnswer, 404, 503))
async def get_drift(
    request: Request,
    name: str,
    version: int | None = Query(None, ge=1, description="a version; default: the one served"),
) -> Response:
    registry: Registry = request.app.state.model_registry
    entry = registry.resolve(name, version)  # 404 unknown, 503 not serving
    report = entry.drift.report()
    body = {
        "model": entry.name,
        "version": entry.version,
        **dataclasses.asdict(report),
        "monitored": [layer for layer in (report.layer,) if layer is not None]
        + [hidden.layer for hidden in report.hidden],
        "min_samples": MIN_SAMPLES,
        "score_definition": SCORE,
    }
    return Response(orjson.dumps(body), media_type="application/json")
