"""Triton's model repository extension, the management API: index, load, unload.

Off unless ``management_api`` is set; with ``management_api_key`` every call needs the key. Load
rescans the model's folder (new versions, changed files) and answers once that is done.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response

from service.errors import FoldserveError, ModelNotFound
from service.registry import Registry
from service.routes.access import require_key

router = APIRouter(prefix="/v2/repository")


def _enabled(request: Request) -> Registry:
    settings = request.app.state.settings
    if not settings.management_api:
        # As if the route did not exist: nothing tells a prober the API is there but off.
        raise ModelNotFound("not found: the management API is off (FOLDSERVE_MANAGEMENT_API)")
    require_key(request, settings.management_api_key, "management_api_key")
    registry: Registry = request.app.state.model_registry
    return registry


@router.post("/index")
async def index(request: Request) -> Response:
    registry = _enabled(request)
    return Response(orjson.dumps(registry.index()), media_type="application/json")


@router.post("/models/{name}/load")
async def load(request: Request, name: str) -> Response:
    registry = _enabled(request)
    await registry.load(name)
    return Response(b"{}", media_type="application/json")


@router.post("/models/{name}/unload")
async def unload(request: Request, name: str) -> Response:
    registry = _enabled(request)
    await registry.unload(name)
    return Response(b"{}", media_type="application/json")


__all__ = ["FoldserveError", "router"]
