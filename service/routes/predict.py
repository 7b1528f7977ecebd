"""The ``/predict`` protocol: JSON in, JSON out. Parsing and encoding live here and only here;
the path from head to answer is service.dataplane's."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import orjson

from service.backends import Array
from service.dataplane import Parsed, predictions
from service.errors import InvalidInput
from service.http.request import Request
from service.http.response import JSON, Response
from service.images import EncodedImages
from service.request_body import BodyLimit, is_image, json_limit
from service.routes.json_numbers import inputs_array
from service.routes.paths import check_version, path_version
from service.routes.responses import quoted
from service.routes.strict_json import check_unique_keys, holds_booleans
from service.settings import Settings, setting_ref
from service.versions import ReadyVersion

_FIELDS = frozenset({"inputs", "images", "model", "version"})


class PredictCodec:
    binary = False
    images = True
    route = "/predict"
    over_grpc = False

    def __init__(self, settings: Settings) -> None:
        self._limit = json_limit(settings)
        self._image_limit = BodyLimit(
            settings.max_body_bytes, setting_ref("max_body_bytes", settings.max_body_bytes)
        )

    def version(self, name: str | None, text: str | None) -> int | None:
        return path_version(text)

    def limit(self, request: Request, ready: ReadyVersion | None) -> BodyLimit:
        return self._image_limit if is_image(request.head.content_type) else self._limit

    def parse(self, body: bytes, request: Request, name: str | None, number: int | None) -> Parsed:
        if is_image(request.head.content_type):  # one image, the file itself
            return Parsed(EncodedImages([body]))
        rows = inputs_array(body)
        if rows is not None:  # the usual body, read without a Python object per number
            return Parsed((rows, body))
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise InvalidInput('body must be a JSON object: {"inputs": [sample, ...]}')
        check_unique_keys(body, payload, bulk="inputs")
        if len(payload) == 1 and "inputs" in payload:  # the usual body: nothing else to check
            return Parsed((payload["inputs"], body))
        unknown = payload.keys() - _FIELDS
        if unknown:
            names = ", ".join(quoted(name) for name in sorted(unknown))
            raise InvalidInput(f"unknown fields [{names}]: expected {sorted(_FIELDS)}")
        if ("inputs" in payload) == ("images" in payload):
            raise InvalidInput(
                'send "inputs": [sample, ...] or, to an image model, "images": [base64, ...]'
            )
        model = _named("model", str, payload.get("model"))
        version = _named("version", int, payload.get("version"))
        if version is not None:
            check_version(version)
        _agree("model", name, model)
        _agree("version", number, version)
        if "images" in payload:
            return Parsed(EncodedImages(_images(payload["images"])), model, version)
        return Parsed((payload["inputs"], body), model, version)

    def rows(self, parsed: Parsed, ready: ReadyVersion) -> list[np.ndarray] | EncodedImages:
        if isinstance(parsed.payload, EncodedImages):
            return parsed.payload
        inputs, body = parsed.payload
        names = ready.signature.inputs.names
        if isinstance(inputs, dict):
            return [_samples(inputs, name, body) for name in _named_inputs(inputs, names)]
        if len(names) > 1:  # a list of samples, for a model of several inputs
            shown = ", ".join(f'"{name}": [sample, ...]' for name in names)
            raise InvalidInput(f'this model takes {len(names)} inputs: send "inputs": {{{shown}}}')
        if isinstance(inputs, np.ndarray):  # read by the fast path (json_numbers), as floats
            if ready.signature.inputs.specs[0].dtype == "float32":
                return [inputs]
            # NOTE: an input of another dtype is read the usual way: integers stay integers.
            inputs = orjson.loads(body)["inputs"]
        return [_samples({"inputs": inputs}, "inputs", body)]

    def encode(self, ready: ReadyVersion, outputs: Array, parsed: Parsed) -> Response:
        packed = ready.signature.outputs
        # NOTE: orjson writes C order only: every array passed is contiguous.
        shown: Array | dict[str, Array] = (
            np.ascontiguousarray(outputs)
            if packed.single
            else {name: packed.part(outputs, i) for i, name in enumerate(packed.names)}
        )
        body = orjson.dumps(
            {
                "model": ready.name,
                "version": ready.version,
                "outputs": shown,
                "predictions": predictions(ready, outputs),
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        return Response(200, body, JSON)


def _images(value: Any) -> list[bytes]:
    """A JSON list of base64 strings (standard or URL-safe alphabet) as the files they hold."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidInput('"images" must be a list of base64 strings, one encoded image each')
    files = []
    for index, text in enumerate(value):
        try:
            files.append(base64.b64decode(text.translate(_URL_SAFE), validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"image {index} is not valid base64") from None
    return files


_URL_SAFE = str.maketrans("-_", "+/")


def _named_inputs(inputs: dict[str, Any], names: tuple[str, ...]) -> tuple[str, ...]:
    """The model's input names, once the body's object names exactly them."""
    if inputs.keys() != set(names):
        sent = ", ".join(quoted(name) for name in inputs)
        raise InvalidInput(f'"inputs" names [{sent}]: this model takes {list(names)}')
    return names


def _samples(inputs: dict[str, Any], name: str, body: bytes) -> np.ndarray:
    """One input's samples as an array (``name``: its key in ``inputs``)."""
    samples = inputs[name]
    field = '"inputs"' if name == "inputs" else f'input "{name}"'
    if not isinstance(samples, list):
        raise InvalidInput(f"{field} must be a list of samples")
    try:
        # NOTE: no dtype here on purpose: numpy would turn "1.5" or null into floats
        # silently; validation refuses non-numeric kinds and casts to float32 itself.
        rows = np.asarray(samples)
    except ValueError:
        raise InvalidInput(f"{field} samples must all have the same shape") from None
    # Booleans alone make a bool array, which validation refuses; among numbers they become
    # 1 and 0 of an integer or float array, which it cannot tell apart.
    if rows.dtype.kind in "iuf" and holds_booleans(body, samples):
        raise InvalidInput(f"{field} must hold numbers only (got true or false among them)")
    return rows


def _named(field: str, kind: type[Any], value: Any) -> Any:
    # bool is an int subclass: {"version": true} must not mean version 1.
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        kind_name = "an integer" if kind is int else "a string"
        raise InvalidInput(f'"{field}" must be {kind_name}, got {quoted(value)}')
    return value


def _agree(field: str, from_path: Any, from_body: Any) -> None:
    """A model or version named in the path and in the body: fine if they agree."""
    if from_path is not None and from_body is not None and from_path != from_body:
        raise InvalidInput(
            f'"{field}" is {quoted(from_body)} in the body but {quoted(from_path)} in the path'
        )
