"""Triton's model repository extension, the management API: index, load, unload.

Off unless ``management_api`` is set; with ``management_api_key`` every call needs the key. Load
rescans the model's folder (new versions, changed files) and answers once that is done.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from fastapi import APIRouter, Request, Response

from service.errors import InvalidInput, ModelNotFound
from service.keys import Keys
from service.registry import Registry
from service.schemas import RepositoryIndex, documented

router = APIRouter(prefix="/v2/repository")
_MAX_LOAD_BODY = 64 << 10


def _enabled(request: Request) -> Registry:
    settings = request.app.state.settings
    if not settings.management_api:
        # As if the route did not exist: nothing tells a prober the API is there but off.
        raise ModelNotFound("not found: the management API is off (FOLDSERVE_MANAGEMENT_API)")
    keys: Keys = request.app.state.management_keys
    keys.check_headers(request.scope["headers"])
    registry: Registry = request.app.state.model_registry
    return registry


@router.post("/index", responses=documented(RepositoryIndex, 401, 404))
async def index(request: Request) -> Response:
    registry = _enabled(request)
    return Response(orjson.dumps(registry.index()), media_type="application/json")


@router.post("/models/{name}/load", responses=documented(None, 400, 401, 404))
async def load(request: Request, name: str) -> Response:
    registry = _enabled(request)
    await _refuse_overrides(request)
    await registry.load(name)
    return Response(b"{}", media_type="application/json")


@router.post("/models/{name}/unload", responses=documented(None, 401, 404))
async def unload(request: Request, name: str) -> Response:
    registry = _enabled(request)
    await registry.unload(name)
    return Response(b"{}", media_type="application/json")


async def _refuse_overrides(request: Request) -> None:
    """Triton's load may carry a configuration override or the model's files; neither is
    supported here, and ignoring them would let a client believe they applied."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_LOAD_BODY:
            raise InvalidInput(
                f"load request body over {_MAX_LOAD_BODY} bytes: model files cannot be uploaded "
                "here; write the version into the model store, then load"
            )
    if not body.strip():
        return
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("load request body must be JSON") from None
    parameters = payload.get("parameters") if isinstance(payload, dict) else None
    if isinstance(parameters, dict):
        check_load_parameters(parameters)


def check_load_parameters(names: Iterable[str]) -> None:
    """Triton's load may carry a configuration override or the model's files (REST and gRPC
    alike): refused, rather than ignored."""
    refused = sorted(k for k in names if k == "config" or k.startswith("file:"))
    if refused:
        raise InvalidInput(
            f"load parameters {refused} are not supported: foldserve loads versions "
            "from the model store only, with the configuration in their manifests"
        )
