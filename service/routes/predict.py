"""The ``/predict`` protocol: JSON in, JSON out. Parsing and encoding live here and only here."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from service.dataplane import DataPlane
from service.errors import FoldserveError, InvalidInput

router = APIRouter()
_FIELDS = frozenset({"inputs", "model", "version"})


def dataplane_of(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.dataplane
    return plane


@router.post("/predict")
async def predict(request: Request) -> Response:
    return await _predict(request, None, None)


@router.post("/models/{name}/predict")
async def predict_model(request: Request, name: str) -> Response:
    return await _predict(request, name, None)


@router.post("/models/{name}/versions/{version}/predict")
async def predict_version(request: Request, name: str, version: int) -> Response:
    return await _predict(request, name, version)


async def _predict(request: Request, name: str | None, version: int | None) -> Response:
    started = time.perf_counter()
    plane = dataplane_of(request)
    try:
        payload = _parse(await request.body())
        name = _pick("model", str, name, payload.get("model"))
        version = _pick("version", int, version, payload.get("version"))
        rows = _to_array(payload["inputs"])
    except FoldserveError as exc:
        plane.reject(exc, started)
        raise
    result = await plane.infer(name, version, rows, started=started)
    body = {
        "model": result.model,
        "version": result.version,
        "outputs": np.ascontiguousarray(result.outputs),  # orjson encodes C-contiguous only
        "predictions": result.predictions(),
    }
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )


def _parse(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput('body must be a JSON object: {"inputs": [sample, ...]}')
    unknown = payload.keys() - _FIELDS
    if unknown:
        raise InvalidInput(f"unknown fields {sorted(unknown)}: expected {sorted(_FIELDS)}")
    if "inputs" not in payload:
        raise InvalidInput('missing "inputs": send {"inputs": [sample, ...]}')
    return payload


def _pick(field: str, kind: type[Any], from_path: Any, from_body: Any) -> Any:
    """A model or version named in the path or the body; both are fine if they agree."""
    # bool is an int subclass: {"version": true} must not mean version 1.
    if from_body is not None and (not isinstance(from_body, kind) or isinstance(from_body, bool)):
        raise InvalidInput(f'"{field}" must be a {kind.__name__}, got {from_body!r}')
    if from_path is not None and from_body is not None and from_path != from_body:
        raise InvalidInput(f'"{field}" is {from_body!r} in the body but {from_path!r} in the path')
    return from_path if from_path is not None else from_body


def _to_array(inputs: Any) -> np.ndarray:
    if not isinstance(inputs, list):
        raise InvalidInput('"inputs" must be a list of samples')
    try:
        # NOTE: no dtype here on purpose: numpy would turn "1.5" or null into floats silently;
        # the dataplane refuses non-numeric kinds and casts to float32 itself.
        return np.asarray(inputs)
    except ValueError:
        raise InvalidInput('"inputs" samples must all have the same shape') from None
