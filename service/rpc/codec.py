"""A ``ModelInfer`` call as the request path reads it (service.dataplane's ``Codec``): its tensors
from ``raw_input_contents`` (little-endian bytes, one entry per input) or typed ``contents``, and
its answer as a ``ModelInferResponse`` whose outputs always travel raw, as tritonclient and the
KServe SDK read them. Everything else (keys, limits, deadlines, admission, batching, counting) is
the path's own, the same for gRPC as for REST.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError

from service.backends import Array
from service.dataplane import Parsed
from service.errors import InvalidInput
from service.http.request import Request
from service.http.response import Response
from service.images import EncodedImages
from service.packing import Packing
from service.request_body import BodyLimit
from service.routes.paths import v2_path_version
from service.routes.responses import quoted
from service.routes.v2 import DATATYPES
from service.rpc import inference_pb2 as pb
from service.rpc.messages import infer_response
from service.store import TensorSpec
from service.versions import ReadyVersion

_ITEMSIZE = {dtype: np.dtype(dtype).itemsize for dtype in DATATYPES.values()}
# Each V2 datatype's list in InferTensorContents (FP16 has none: raw only).
_TYPED = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
}


def infer_request(raw: bytes) -> pb.ModelInferRequest:
    try:
        message: pb.ModelInferRequest = pb.ModelInferRequest.FromString(raw)
    except DecodeError:
        raise InvalidInput("the request is not a valid ModelInferRequest message") from None
    return message


def timeout_s(message: pb.ModelInferRequest) -> float | None:
    """The request's ``timeout`` parameter (microseconds, as Triton's clients send it)."""
    if "timeout" not in message.parameters:
        return None
    parameter = message.parameters["timeout"]
    kind = parameter.WhichOneof("parameter_choice")
    micros = getattr(parameter, kind) if kind in ("int64_param", "uint64_param") else None
    if micros is None or micros <= 0:
        raise InvalidInput('parameter "timeout" must be a positive integer (microseconds)')
    return float(min(micros, 10**12)) / 1e6


class InferCall:
    """One call's side of the request path: the message is parsed once, before the path
    starts (its model and version decide where it is admitted)."""

    binary = True  # the request's "body" is the message's bytes
    images = False
    route = "grpc ModelInfer"
    over_grpc = True

    def __init__(self, message: pb.ModelInferRequest, limit: BodyLimit) -> None:
        self.message = message
        self._limit = limit
        self._outputs: tuple[int, ...] = ()

    def version(self, name: str | None, text: str | None) -> int | None:
        assert name is not None
        return v2_path_version(name, text or None)

    def limit(self, request: Request, ready: ReadyVersion | None) -> BodyLimit:
        return self._limit

    def parse(self, body: bytes, request: Request, name: str | None, number: int | None) -> Parsed:
        return Parsed(self.message, None, None, timeout_s(self.message))

    def rows(self, parsed: Parsed, ready: ReadyVersion) -> list[np.ndarray] | EncodedImages:
        message = self.message
        inputs = ready.signature.inputs
        tensors = message.inputs
        names = inputs.names
        if len(tensors) != len(names):
            wanted = f"one tensor {names[0]!r}" if inputs.single else f"{len(names)} {names}"
            raise InvalidInput(f"inputs must be {wanted}, got {len(tensors)}")
        raw = message.raw_input_contents
        if raw and len(raw) != len(tensors):
            raise InvalidInput(
                f"raw_input_contents holds {len(raw)} entries for {len(tensors)} inputs: send "
                "one per input, in the order of inputs"
            )
        arrays: list[np.ndarray | None] = [None] * len(names)
        for position, tensor in enumerate(tensors):
            index = _position(tensor.name, inputs)
            if arrays[index] is not None:
                raise InvalidInput(f"input {tensor.name!r} is sent twice")
            spec = inputs.specs[index]
            shape = _shape(tuple(tensor.shape), spec)
            dtype = DATATYPES.get(tensor.datatype)
            if dtype is None:
                raise InvalidInput(
                    f"input {spec.name!r} has datatype {quoted(tensor.datatype)}: send one of "
                    f"{sorted(DATATYPES)}"
                )
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidInput(f"input {spec.name!r} has both raw and typed contents")
                arrays[index] = _from_raw(raw[position], dtype, shape, tensor.datatype, spec)
            else:
                arrays[index] = _from_typed(tensor, dtype, shape, spec)
        self._outputs = _chosen_outputs(message, ready.signature.outputs)
        return [array for array in arrays if array is not None]

    def encode(self, ready: ReadyVersion, outputs: Array, parsed: Parsed) -> Response:
        packing = ready.signature.outputs
        tensors = [
            (
                packing.names[index],
                "FP32",
                np.ascontiguousarray(packing.part(outputs, index), dtype="<f4"),
            )
            for index in self._outputs
        ]
        body = infer_response(ready.name, str(ready.version), self.message.id, tensors)
        return Response(200, body, None)


def _position(name: str, inputs: Packing) -> int:
    if name not in inputs.names:
        model = f"input is {inputs.names[0]!r}" if inputs.single else f"inputs are {inputs.names}"
        raise InvalidInput(f"input is named {quoted(name)}: this model's {model}")
    return inputs.names.index(name)


def _shape(shape: tuple[int, ...], spec: TensorSpec) -> tuple[int, ...]:
    # NOTE: the sample dimensions are the spec's (positive); only the count may be anything.
    if not shape or shape[1:] != spec.shape or shape[0] < 0:
        expected = f"[n, {', '.join(map(str, spec.shape))}]"
        raise InvalidInput(f"input {spec.name!r}: shape must be {expected}, got {list(shape)}")
    return shape


def _from_raw(
    data: bytes, dtype: str, shape: tuple[int, ...], datatype: str, spec: TensorSpec
) -> np.ndarray:
    needed = math.prod(shape) * _ITEMSIZE[dtype]
    if len(data) != needed:
        raise InvalidInput(
            f"input {spec.name!r}: shape {list(shape)} of {datatype} needs {needed} bytes, its "
            f"raw contents hold {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_typed(
    tensor: pb.ModelInferRequest.InferInputTensor,
    dtype: str,
    shape: tuple[int, ...],
    spec: TensorSpec,
) -> np.ndarray:
    field = _TYPED.get(tensor.datatype)
    if field is None:
        raise InvalidInput(
            f"input {spec.name!r}: {tensor.datatype} values travel in raw_input_contents only"
        )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {spec.name!r}: shape {list(shape)} needs {count} values, {field} holds "
            f"{len(values)}"
        )
    # NOTE: int_contents and uint_contents are 32-bit lists: a UINT8 value past 255 is refused
    # by the request path's range check once cast, not wrapped here.
    wide = "<i8" if field in ("int_contents", "uint_contents") else dtype
    return np.asarray(values, dtype=wide).reshape(shape)


def _chosen_outputs(message: pb.ModelInferRequest, outputs: Packing) -> tuple[int, ...]:
    """The outputs the answer holds, in the request's order, or all of them."""
    if not message.outputs:
        return tuple(range(len(outputs.names)))
    chosen: list[int] = []
    for output in message.outputs:
        if output.name not in outputs.names:
            model = (
                f"output is {outputs.names[0]!r}"
                if outputs.single
                else f"outputs are {list(outputs.names)}"
            )
            raise InvalidInput(f"output {quoted(output.name)} does not exist: this model's {model}")
        if "classification" in output.parameters:
            raise InvalidInput("the classification extension is not supported")
        index = outputs.names.index(output.name)
        if index in chosen:
            raise InvalidInput(f"output {output.name!r} is asked for twice")
        chosen.append(index)
    return tuple(chosen)
