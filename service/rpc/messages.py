"""A ``ModelInferResponse`` written directly in protobuf's wire format: the tensors' bytes are
copied once, into the message, and the fields before them are the same for every answer of a
version but for the batch size and the id. The bytes are those ``SerializeToString`` writes
(tests/service/test_grpc_messages.py), so any protobuf reader takes them."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

_LENGTH_DELIMITED = 2
# ModelInferResponse's fields, and its InferOutputTensor's
_MODEL_NAME, _MODEL_VERSION, _ID, _OUTPUTS, _RAW_OUTPUT_CONTENTS = 1, 2, 3, 5, 6
_TENSOR_NAME, _TENSOR_DATATYPE, _TENSOR_SHAPE = 1, 2, 3


def varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message, packed numbers)."""
    return varint(number << 3 | _LENGTH_DELIMITED) + varint(len(payload)) + payload


def _text(number: int, value: str) -> bytes:
    return field(number, value.encode()) if value else b""


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Sequence[tuple[str, str, np.ndarray]],  # name, datatype, values (C-contiguous)
) -> bytes:
    described = tuple((name, datatype, values.shape) for name, datatype, values in outputs)
    head, tensors, raw_keys = _fixed(model_name, model_version, described)
    parts = [head, _text(_ID, request_id) if request_id else b"", tensors]
    for key, (_, _, values) in zip(raw_keys, outputs, strict=True):
        parts.append(key)
        parts.append(values.data)  # type: ignore[arg-type]  # joined as bytes, not copied first
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _fixed(
    model_name: str, model_version: str, outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
) -> tuple[bytes, bytes, tuple[bytes, ...]]:
    """What an answer's bytes hold besides its id and its values: the same for every answer of
    a version with the same outputs and rows, so written once."""
    head = _text(_MODEL_NAME, model_name) + _text(_MODEL_VERSION, model_version)
    tensors = b""
    raw_keys = []
    for name, datatype, shape in outputs:
        dims = b"".join(varint(d) for d in shape)
        tensor = _text(_TENSOR_NAME, name) + _text(_TENSOR_DATATYPE, datatype)
        tensors += field(_OUTPUTS, tensor + field(_TENSOR_SHAPE, dims))
        nbytes = _ITEMSIZE[datatype] * math.prod(shape)
        raw_keys.append(varint(_RAW_OUTPUT_CONTENTS << 3 | _LENGTH_DELIMITED) + varint(nbytes))
    return head, tensors, tuple(raw_keys)


_ITEMSIZE = {"FP32": 4, "FP64": 8, "FP16": 2, "INT32": 4, "INT64": 8, "UINT8": 1}
