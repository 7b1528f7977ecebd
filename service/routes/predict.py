"""The ``/predict`` protocol: JSON in, JSON out. Parsing and encoding live here and only here.

NOTE: these routes are served by a raw ASGI handler in front of FastAPI, not by FastAPI routes.
For a model that runs in microseconds, FastAPI's per-request machinery (dependency solving,
cookie parsing, the telemetry hook) cost more than the model and the batcher together (see
docs/performance.md). Everything else (health, models, metrics, errors) stays in FastAPI.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import orjson
from starlette.types import Receive, Scope, Send

from service.dataplane import DataPlane, InferenceResult
from service.errors import FoldserveError, InvalidInput
from service.routes.access import Keys
from service.routes.asgi import header, method_not_allowed, read_body, respond, respond_error
from service.routes.content import body_decoder
from service.routes.paths import check_version, path_version
from service.routes.responses import quoted
from service.routes.strict_json import check_unique_keys, holds_booleans
from service.shedding import TIMEOUT_HEADER, requested_timeout

_FIELDS = frozenset({"inputs", "model", "version"})
_MODEL_PATH = re.compile(r"/models/([^/]+)(?:/versions/([^/]+))?/predict")  # fullmatch


class PredictRoutes:
    """Answers ``POST /predict`` and ``POST /models/{name}[/versions/{v}]/predict`` in raw ASGI."""

    def __init__(self, dataplane: DataPlane, max_body_bytes: int, keys: Keys | None = None) -> None:
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes
        self.keys = keys  # None when no key is required: no check at all

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve the request if it is one of ours; ``False`` leaves it to the framework."""
        if scope["type"] != "http":
            return False
        path: str = scope["path"]
        match = _MODEL_PATH.fullmatch(path)
        if path != "/predict" and match is None:
            return False
        if scope["method"] != "POST":
            await method_not_allowed(send, scope["method"])
        elif match is None:
            await self._predict(scope, receive, send, None, None)
        else:
            await self._predict(scope, receive, send, match.group(1), match.group(2))
        return True

    async def _predict(
        self, scope: Scope, receive: Receive, send: Send, name: str | None, version: str | None
    ) -> None:
        started = time.perf_counter()
        plane = self.dataplane
        gate = None
        try:
            try:
                if self.keys is not None:
                    self.keys.check(scope)  # first: a caller without the key learns nothing
                decoder = body_decoder(scope)
                deadline = plane.deadline(requested_timeout(header(scope, TIMEOUT_HEADER)))
                number = path_version(version)
                # The model a body would name is unknown yet: the path's, or the default one.
                gate = await plane.enter(name, number, deadline)
                body = await read_body(scope, receive, self.max_body_bytes, decoder)
                payload = _parse(body)
                model = _pick("model", str, name, payload.get("model"))
                number = _pick("version", int, number, payload.get("version"))
                rows = _to_array(payload["inputs"], body)
            except FoldserveError as exc:
                plane.reject(exc, started)
                raise
            body = await plane.infer(
                model, number, rows, _encode, started=started, deadline=deadline
            )
        except Exception as exc:
            await respond_error(send, exc, "/predict")
            return
        finally:
            if gate is not None:  # answered (or the client went away): the next may come in
                gate.leave()
        await respond(send, 200, body)


def _encode(result: InferenceResult) -> bytes:
    return orjson.dumps(
        {
            "model": result.model,
            "version": result.version,
            "outputs": np.ascontiguousarray(result.outputs),  # orjson: C order only
            "predictions": result.predictions(),
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def _parse(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput('body must be a JSON object: {"inputs": [sample, ...]}')
    check_unique_keys(body, payload, bulk="inputs")
    unknown = payload.keys() - _FIELDS
    if unknown:
        names = ", ".join(quoted(name) for name in sorted(unknown))
        raise InvalidInput(f"unknown fields [{names}]: expected {sorted(_FIELDS)}")
    if "inputs" not in payload:
        raise InvalidInput('missing "inputs": send {"inputs": [sample, ...]}')
    return payload


def _pick(field: str, kind: type[Any], from_path: Any, from_body: Any) -> Any:
    """A model or version named in the path or the body; both are fine if they agree."""
    # bool is an int subclass: {"version": true} must not mean version 1.
    if from_body is not None and (not isinstance(from_body, kind) or isinstance(from_body, bool)):
        kind_name = "an integer" if kind is int else "a string"
        raise InvalidInput(f'"{field}" must be {kind_name}, got {quoted(from_body)}')
    if kind is int and from_body is not None:
        check_version(from_body)
    if from_path is not None and from_body is not None and from_path != from_body:
        raise InvalidInput(
            f'"{field}" is {quoted(from_body)} in the body but {quoted(from_path)} in the path'
        )
    return from_path if from_path is not None else from_body


def _to_array(inputs: Any, body: bytes) -> np.ndarray:
    if not isinstance(inputs, list):
        raise InvalidInput('"inputs" must be a list of samples')
    try:
        # NOTE: no dtype here on purpose: numpy would turn "1.5" or null into floats silently;
        # the dataplane refuses non-numeric kinds and casts to float32 itself.
        rows = np.asarray(inputs)
    except ValueError:
        raise InvalidInput('"inputs" samples must all have the same shape') from None
    # Booleans alone make a bool array, which the dataplane refuses; among numbers they become
    # 1 and 0 of an integer or float array, which it cannot tell apart.
    if rows.dtype.kind in "iuf" and holds_booleans(body, inputs):
        raise InvalidInput('"inputs" must hold numbers only (got true or false among them)')
    return rows
