"""Liveness (the process answers) and readiness (the default model is verified and serving)."""

from __future__ import annotations

import os
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from service.keys import Keys
from service.routes.models import describe, registry_of
from service.schemas import Liveness, Readiness, documented

router = APIRouter()


@router.get("/healthz", responses=documented(Liveness))
async def healthz() -> Response:
    # The pid tells which worker answered when several share the port.
    body = orjson.dumps({"status": "alive", "pid": os.getpid()})
    return Response(body, media_type="application/json")


@router.get("/readyz", responses=documented(Readiness, 503))
async def readyz(request: Request) -> Response:
    registry = registry_of(request)
    ready, reason = registry.readiness()
    if request.app.state.draining:
        ready, reason = False, "shutting down: finishing the requests in flight"
    body: dict[str, Any] = {"ready": ready, "reason": reason}
    keys: Keys = request.app.state.inference_keys
    if not keys.required:
        # Open to all, this probe tells no more than the key-guarded /models would.
        body["models"] = [describe(e) for e in registry.entries()]
    return Response(
        orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json"
    )
