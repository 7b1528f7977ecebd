"""A ``ModelInferResponse`` written directly in protobuf's wire format: the tensors' bytes are
copied once, into the message, and the fields before them are the same for every answer of a
version but for the batch size and the id. The bytes are those ``SerializeToString`` writes
(tests/service/test_grpc_messages.py), so any protobuf reader takes them."""

from __future__ import annotations

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
    parts = [_text(_MODEL_NAME, model_name), _text(_MODEL_VERSION, model_version)]
    parts.append(_text(_ID, request_id))
    for name, datatype, values in outputs:
        shape = b"".join(varint(d) for d in values.shape)
        tensor = _text(_TENSOR_NAME, name) + _text(_TENSOR_DATATYPE, datatype)
        parts.append(field(_OUTPUTS, tensor + field(_TENSOR_SHAPE, shape)))
    for _, _, values in outputs:
        key = varint(_RAW_OUTPUT_CONTENTS << 3 | _LENGTH_DELIMITED)
        parts.append(key + varint(values.nbytes))
        parts.append(values.data)  # type: ignore[arg-type]  # joined as bytes, not copied first
    return b"".join(parts)
