"""The KServe V2 / Open Inference Protocol, with Triton's binary tensor and config extensions.

Parsing and encoding live here and only here; inference goes through service.dataplane (the
``V2Codec`` below), so V2 requests join the same batches as ``/predict`` ones. Metadata, health
and config are ordinary FastAPI routes.

Binary tensors: with the header ``Inference-Header-Content-Length: n`` the body is ``n`` bytes of
JSON, then the raw little-endian bytes of every input whose ``parameters.binary_data_size`` is
set, in input order. Outputs asked for as binary come back the same way.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response

from service import v2_documents as documents
from service.backends import Array
from service.dataplane import Parsed
from service.errors import FoldserveError, InvalidInput, ModelNotReady, PayloadTooLarge
from service.http.request import Request as HttpRequest
from service.http.response import JSON
from service.http.response import Response as HttpResponse
from service.images import EncodedImages
from service.packing import Packing
from service.request_body import BodyLimit, byte_count, check_items, json_limit, megabytes
from service.routes.models import registry_of
from service.routes.paths import v2_path_version
from service.routes.responses import error_body, quoted
from service.routes.strict_json import check_unique_keys, holds_booleans
from service.routes.v2_headers import (
    AnswerHeaders,
    BinaryInput,
    BinaryInputs,
    ChosenOutputs,
    Header,
    HeaderMemo,
    Plan,
    answer_header,
    binary_size,
)
from service.routes.v2_images import image_request
from service.schemas import (
    LiveAnswer,
    ModelConfig,
    ModelMetadata,
    ModelReadyAnswer,
    ReadyAnswer,
    ServerMetadata,
    documented,
)
from service.settings import Settings, setting_ref
from service.shedding import timeout_parameter
from service.store import TensorSpec
from service.versions import ReadyVersion

HEADER_LENGTH = b"inference-header-content-length"
# V2 datatype -> little-endian wire dtype; the dataplane casts each to the input's own dtype,
# once it checked the values fit it.
DATATYPES = {
    "FP32": "<f4",
    "FP64": "<f8",
    "FP16": "<f2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
}

# NOTE: the routes behind the inference key, and the health probes, which are always open.
router = APIRouter(prefix="/v2")
health_router = APIRouter(prefix="/v2")


# ---------------------------------------------------------------- infer (service.dataplane)


class V2Codec:
    """``POST /v2/models/{name}[/versions/{v}]/infer``: JSON tensors, or Triton's binary ones."""

    binary = True
    images = False  # V2 sends images as BYTES tensors (service.routes.v2_images)
    route = "/v2 infer"
    over_grpc = False

    def __init__(self, settings: Settings) -> None:
        self._json = json_limit(settings)
        self._binary = BodyLimit(
            settings.max_body_bytes, setting_ref("max_body_bytes", settings.max_body_bytes)
        )
        self._headers = HeaderMemo()
        self._answers = AnswerHeaders()

    def version(self, name: str | None, text: str | None) -> int | None:
        assert name is not None  # the path always names the model
        return v2_path_version(name, text)

    def limit(self, request: HttpRequest, ready: ReadyVersion | None) -> BodyLimit:
        declared = request.head.inference_header_length
        if declared is None:
            return self._json
        header = byte_count(declared)
        if header is not None and header > self._json.max_bytes:
            raise PayloadTooLarge(
                f"JSON header of {megabytes(header)} exceeds {self._json.bytes_setting}"
            )
        length = request.head.content_length
        total = None if length is None else byte_count(length)
        if (
            ready is not None
            and ready.manifest.image is None  # encoded images: counted once parsed
            and header is not None
            and total is not None
            and total > header
        ):
            # At 8 bytes a value at most (FP64, INT64), the binary part holds at least this
            # many rows: refused before it is read when the queue could never hold them.
            values = ready.signature.inputs.values
            rows = (total - header) // (8 * values)
            limit = ready.admission.max_queue_rows
            if rows > limit:
                raise PayloadTooLarge(
                    f"request holds at least {rows} rows of binary tensor data but at most "
                    f"{limit} can queue for model {ready.name!r} v{ready.version} "
                    f"({ready.admission.queue_limit}): send fewer rows per request"
                )
        return self._binary

    def parse(
        self, body: bytes, request: HttpRequest, name: str | None, number: int | None
    ) -> Parsed:
        assert name is not None
        declared = request.head.inference_header_length
        length = _header_length(body, declared)
        text = body[:length]  # a copy of the JSON header alone (none when it is the whole body)
        header = self._headers.get(text, name, number) if declared is not None else None
        if header is None:
            payload = _payload(text)
            if declared is not None:  # a JSON body was counted whole
                check_items(text, self._json)
            header = Header(
                payload,
                text,
                _named_model(payload, name, number),
                timeout_parameter(payload.get("parameters")),
                payload.get("id"),
            )
            if declared is not None:
                self._headers.keep(header, name, number)
        return Parsed(
            _Body(header, memoryview(body)[length:]), None, header.version, header.timeout_s
        )

    def rows(self, parsed: Parsed, ready: ReadyVersion) -> list[np.ndarray] | EncodedImages:
        wire: _Body = parsed.payload
        header, signature = wire.header, ready.signature
        plan = header.plans.get(signature)
        if plan is not None:  # this header, checked against these tensors before
            wire.outputs = plan.outputs
            return plan.rows(wire.binary)
        if ready.manifest.image is not None:
            images = image_request(header.payload, wire.binary, ready)
            if images is not None:
                wire.outputs = _chosen_outputs(header.payload, signature.outputs)
                return images
        declared = _input_tensors(header.payload, signature.inputs)
        arrays: list[np.ndarray | None] = [None] * len(signature.inputs.specs)
        binaries: list[BinaryInput] = []
        offset = 0
        for tensor in declared:
            binary = _binary_input(tensor, signature.inputs, offset)
            if binary is None:
                arrays[tensor.position] = _json_rows(tensor, header.text, signature.inputs)
            else:
                binaries.append(binary)
                offset += binary.size
        reader = BinaryInputs(tuple(binaries), offset)
        for binary, rows in zip(binaries, reader.rows(wire.binary), strict=True):
            arrays[binary.index] = rows
        wire.outputs = _chosen_outputs(header.payload, signature.outputs)
        if len(binaries) == len(arrays):
            header.plans[signature] = Plan(reader, wire.outputs)
        return [rows for rows in arrays if rows is not None]  # each input is declared once

    def encode(self, ready: ReadyVersion, outputs: Array, parsed: Parsed) -> HttpResponse:
        wire: _Body = parsed.payload
        return _encode(ready, outputs, wire.header.request_id, wire.outputs, self._answers)


class _Body:
    """A V2 body as parsed: its JSON header, the binary part after it, the answer's form."""

    __slots__ = ("binary", "header", "outputs")

    def __init__(self, header: Header, binary: memoryview) -> None:
        self.header = header
        self.binary = binary
        self.outputs: ChosenOutputs = ()


def _header_length(body: bytes, declared: bytes | None) -> int:
    """The JSON header's length: the declared one, or the whole body without the header."""
    if declared is None:
        return len(body)
    count = byte_count(declared)
    if count is None:
        shown = declared[:20].decode(errors="replace") + ("..." if len(declared) > 20 else "")
        raise InvalidInput(f"Inference-Header-Content-Length must be a byte count, got {shown!r}")
    if count > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {count} but the body has {len(body)} bytes"
        )
    return count


def _payload(text: bytes) -> dict[str, Any]:
    """The JSON header parsed, an object whose keys each appear once."""
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request JSON is not valid: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidInput('request must be a JSON object: {"inputs": [...]}')
    check_unique_keys(text, payload, bulk="data")
    # NOTE: other top-level fields are ignored, as the protocol's schema allows: clients add
    # their own (the KServe SDK sends "model_name"; see _named_model).
    if "id" in payload and not isinstance(payload["id"], str):
        raise InvalidInput(f'"id" must be a string, got {quoted(payload["id"])}')
    return payload


def _named_model(payload: dict[str, Any], name: str, version: int | None) -> int | None:
    """The version to run, once what the body names agrees with the path.

    ``model_name`` (the KServe SDK sends it) must be the path's model. ``model_version``, a
    string as in V2 answers, must be the path's version; with none in the path it picks one.
    """
    named = payload.get("model_name")
    if named is not None and named != name:
        raise InvalidInput(f'"model_name" is {quoted(named)} in the body but {name!r} in the path')
    asked = payload.get("model_version")
    if asked is None or asked == "":
        return version
    if not isinstance(asked, str):
        raise InvalidInput(f'"model_version" must be a string, got {quoted(asked)}')
    number = v2_path_version(name, asked)
    if version is not None and number != version:
        raise InvalidInput(
            f'"model_version" is {quoted(asked)} in the body but {str(version)!r} in the path'
        )
    return number


class _Declared(NamedTuple):
    """One input's tensor object and what it declares, checked against that model input."""

    tensor: dict[str, Any]
    position: int  # of the model's input it is, in the manifest's order
    datatype: str  # V2's name
    dtype: str  # the wire's little-endian dtype
    shape: list[int]


def _input_tensors(payload: dict[str, Any], inputs: Packing) -> list[_Declared]:
    """The input tensor objects in the request's order: each of the model's inputs once, by
    name, with a datatype and a shape that fit it."""
    tensors = payload.get("inputs")
    names = inputs.names
    if (
        not isinstance(tensors, list)
        or len(tensors) != len(names)
        or not all(isinstance(tensor, dict) for tensor in tensors)
    ):
        got = len(tensors) if isinstance(tensors, list) else type(tensors).__name__
        wanted = f"one tensor {names[0]!r}" if inputs.single else f"{len(names)} tensors {names}"
        raise InvalidInput(f'"inputs" must be a list of {wanted}, got {got}')
    declared: list[_Declared] = []
    seen: set[str] = set()
    for tensor in tensors:
        name = tensor.get("name")
        if not isinstance(name, str) or name not in names:
            model = f"input is {names[0]!r}" if inputs.single else f"inputs are {list(names)}"
            raise InvalidInput(f"input is named {quoted(name)}: this model's {model}")
        if name in seen:
            raise InvalidInput(f"input {name!r} is sent twice")
        seen.add(name)
        index = names.index(name)
        spec = inputs.specs[index]
        datatype, dtype = _datatype(tensor, spec)
        shape = _shape(tensor.get("shape"), spec)
        declared.append(_Declared(tensor, index, datatype, dtype, shape))
    return declared


def _datatype(tensor: dict[str, Any], spec: TensorSpec) -> tuple[str, str]:
    """The tensor's V2 datatype and its wire dtype."""
    datatype = tensor.get("datatype")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None or not isinstance(datatype, str):
        raise InvalidInput(
            f"input {spec.name!r} has datatype {quoted(datatype)}: send one of {sorted(DATATYPES)}"
        )
    return datatype, dtype


def _binary_input(declared: _Declared, inputs: Packing, offset: int) -> BinaryInput | None:
    """Where the input's rows are in the binary part (from ``offset``), checked; None for JSON
    ``data``."""
    tensor, index, datatype, dtype, shape = declared
    name = inputs.names[index]
    size = binary_size(tensor)
    if size is None:
        return None
    if "data" in tensor:
        raise InvalidInput(f"input {name!r} has both binary_data_size and JSON data")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if size != nbytes:
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {size} but shape {shape} of "
            f"{datatype} needs {nbytes} bytes"
        )
    return BinaryInput(name, index, dtype, tuple(shape), size, offset)


def _json_rows(declared: _Declared, text: bytes, inputs: Packing) -> np.ndarray:
    """The input's JSON ``data`` as an array shaped by its ``shape``, in its wire dtype."""
    tensor, index, datatype, _, shape = declared
    name = inputs.names[index]
    count = math.prod(shape)
    if "data" not in tensor:
        raise InvalidInput(f'input {name!r} has no "data" and no binary_data_size')
    try:
        # NOTE: no dtype here on purpose: numpy would turn "1.5" or null into numbers silently.
        rows = np.asarray(tensor["data"])
    except ValueError:
        raise InvalidInput(f'input {name!r}: "data" is ragged') from None
    numbers = "iu" if datatype.startswith(("INT", "UINT")) else "fiu"
    # Booleans among numbers become 1 and 0 of a numeric array: looked for in the JSON itself.
    if rows.dtype.kind not in numbers or holds_booleans(text, tensor["data"]):
        raise InvalidInput(f'input {name!r}: "data" must hold {datatype} numbers only')
    if rows.size != count:
        raise InvalidInput(
            f'input {name!r}: shape {shape} needs {count} values, "data" holds {rows.size}'
        )
    return rows.reshape(shape)


def _shape(value: Any, spec: TensorSpec) -> list[int]:
    expected = f"[n, {', '.join(map(str, spec.shape))}]"
    if (
        not isinstance(value, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
        or tuple(value[1:]) != spec.shape
    ):
        raise InvalidInput(f"input {spec.name!r}: shape must be {expected}, got {quoted(value)}")
    return value


def _chosen_outputs(payload: dict[str, Any], outputs: Packing) -> ChosenOutputs:
    """The outputs the answer holds, in its order, and whether each goes back as raw bytes:
    those the request names (each its own choice, else the request's default), or all."""
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    default = parameters.get("binary_data_output", False) is True
    requested = payload.get("outputs")
    if requested is None or requested == []:
        return tuple((index, default) for index in range(len(outputs.names)))
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise InvalidInput('"outputs" must be a list of {"name": ...} objects')
    chosen: list[tuple[int, bool]] = []
    for output in requested:
        name = output.get("name")
        if not isinstance(name, str) or name not in outputs.names:
            model = (
                f"output is {outputs.names[0]!r}"
                if outputs.single
                else f"outputs are {list(outputs.names)}"
            )
            raise InvalidInput(f"output {quoted(name)} does not exist: this model's {model}")
        own = output.get("parameters") or {}
        if not isinstance(own, dict):
            raise InvalidInput('"parameters" must be an object')
        if own.get("classification"):
            raise InvalidInput("the classification extension is not supported")
        index = outputs.names.index(name)
        if any(index == done for done, _ in chosen):
            raise InvalidInput(f"output {name!r} is asked for twice")
        chosen.append((index, own.get("binary_data", default) is True))
    return tuple(chosen)


def _encode(
    ready: ReadyVersion,
    result: Array,
    request_id: str | None,
    chosen: ChosenOutputs,
    answers: AnswerHeaders,
) -> HttpResponse:
    outputs = ready.signature.outputs
    if len(chosen) == 1 and outputs.single:
        return _encode_one(ready, result, request_id, chosen[0][1], answers)
    tensors: list[dict[str, Any]] = []
    raw: list[bytes] = []
    for index, binary in chosen:
        values = np.ascontiguousarray(outputs.part(result, index), dtype="<f4")
        tensor: dict[str, Any] = {
            "name": outputs.names[index],
            "datatype": "FP32",
            "shape": values.shape,
        }
        if binary:
            tensor["parameters"] = {"binary_data_size": values.nbytes}
            raw.append(values.tobytes())
        else:
            tensor["data"] = values.reshape(-1)
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": ready.name, "model_version": str(ready.version)}
    if request_id is not None:
        answer["id"] = request_id
    answer["outputs"] = tensors
    body = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raw:
        return HttpResponse(200, body, JSON)
    headers = [(HEADER_LENGTH, b"%d" % len(body))]
    tail = memoryview(b"".join(raw))
    return HttpResponse(200, body, b"application/octet-stream", headers, tail=tail)


def _encode_one(
    ready: ReadyVersion, result: Array, request_id: str | None, binary: bool, answers: AnswerHeaders
) -> HttpResponse:
    """The answer of a model with one output (the usual case: its binary header is kept)."""
    spec = ready.manifest.outputs[0]
    outputs = np.ascontiguousarray(result, dtype="<f4")  # orjson: C order only
    if binary:
        shape = outputs.shape
        body = (
            answers.header(ready.name, ready.version, spec.name, shape)
            if request_id is None
            else answer_header(ready.name, ready.version, spec.name, shape, request_id)
        )
        headers = [(HEADER_LENGTH, b"%d" % len(body))]
        raw = outputs.data.cast("B")  # the array's own bytes, kept alive by the view
        return HttpResponse(200, body, b"application/octet-stream", headers, tail=raw)
    tensor: dict[str, Any] = {"name": spec.name, "datatype": "FP32", "shape": outputs.shape}
    tensor["data"] = outputs.reshape(-1)
    answer: dict[str, Any] = {"model_name": ready.name, "model_version": str(ready.version)}
    if request_id is not None:
        answer["id"] = request_id
    answer["outputs"] = [tensor]
    return HttpResponse(200, orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), JSON)


# ---------------------------------------------------------------- metadata, health, config


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _error(exc: FoldserveError) -> Response:
    return Response(error_body(exc.message), exc.status, exc.headers(), "application/json")


def _resolve(request: Request, name: str, version: str | None) -> ReadyVersion:
    return registry_of(request).resolve(name, v2_path_version(name, version))


@router.get("", responses=documented(ServerMetadata))
@router.get("/", include_in_schema=False)  # the path as the protocol's document writes it
async def server_metadata(request: Request) -> Response:
    return _json(documents.server_metadata(request.app.state.settings))


@health_router.get("/health/live", responses=documented(LiveAnswer))
async def live() -> Response:
    return _json({"live": True})


@health_router.get("/health/ready", responses=documented(ReadyAnswer, 503))
async def ready(request: Request) -> Response:
    is_ready, reason = registry_of(request).readiness()
    if request.app.state.draining:  # as /readyz: a server shutting down takes no new traffic
        is_ready, reason = False, "shutting down: finishing the requests in flight"
    return _json({"ready": True}) if is_ready else _error(ModelNotReady(reason))


@router.get("/models/{name}", responses=documented(ModelMetadata, 404, 503))
@router.get("/models/{name}/versions/{version}", responses=documented(ModelMetadata, 404, 503))
async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    entry = _resolve(request, name, version)
    return _json(documents.model_metadata(registry_of(request), entry))


@router.get("/models/{name}/ready", responses=documented(ModelReadyAnswer, 404, 503))
@router.get(
    "/models/{name}/versions/{version}/ready", responses=documented(ModelReadyAnswer, 404, 503)
)
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    """200 when that version serves; 404 for an unknown model or version; 503 otherwise."""
    entry = _resolve(request, name, version)  # only a ready version resolves
    return _json({"name": entry.name, "ready": True})


@router.get("/models/{name}/config", responses=documented(ModelConfig, 404, 503))
@router.get("/models/{name}/versions/{version}/config", responses=documented(ModelConfig, 404, 503))
async def model_config(request: Request, name: str, version: str | None = None) -> Response:
    """Triton's model configuration, enough for perf_analyzer and tritonclient."""
    return _json(documents.model_config(_resolve(request, name, version)))
