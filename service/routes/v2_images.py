"""Images over V2: a ``BYTES`` tensor of encoded images (PNG or JPEG) for an image model's input,
as Triton's image clients send them.

Binary (Triton's form, tritonclient's default for BYTES): each element is its length as 4
little-endian bytes, then its bytes, one after the other. JSON: each element a base64 string
(JSON cannot hold the raw bytes of an image). Shape ``[n]`` or ``[n, 1]``: n images.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

from service.dataplane import image_input
from service.errors import InvalidInput
from service.images import EncodedImages
from service.routes.responses import quoted
from service.routes.v2_headers import binary_size
from service.versions import ReadyVersion

_LENGTH = struct.Struct("<I")


def image_request(
    payload: dict[str, Any], binary: memoryview, ready: ReadyVersion
) -> EncodedImages | None:
    """The images of a request whose one input is a BYTES tensor; None for a request of numbers
    (read as usual)."""
    inputs = payload.get("inputs")
    if not (
        isinstance(inputs, list)
        and len(inputs) == 1
        and isinstance(inputs[0], dict)
        and inputs[0].get("datatype") == "BYTES"
    ):
        return None
    tensor: dict[str, Any] = inputs[0]
    spec = image_input(ready)  # 415 for a model that takes no images
    if tensor.get("name") != spec.input:
        raise InvalidInput(
            f"input is named {quoted(tensor.get('name'))}: this model's input is {spec.input!r}"
        )
    count = _count(tensor.get("shape"))
    size = binary_size(tensor)
    if size is None:
        if len(binary):
            raise InvalidInput(f"{len(binary)} bytes follow the JSON header but no input is binary")
        files = _base64_files(tensor.get("data"))
    else:
        if "data" in tensor:
            raise InvalidInput(f"input {spec.input!r} has both binary_data_size and JSON data")
        if size != len(binary):
            raise InvalidInput(
                f"input {spec.input!r}: binary_data_size is {size} but {len(binary)} bytes "
                "follow the JSON header"
            )
        files = _length_prefixed(binary)
    if len(files) != count:
        raise InvalidInput(
            f"input {spec.input!r}: shape says {count} images, it holds {len(files)}"
        )
    return EncodedImages(files)


def _count(shape: Any) -> int:
    ok = (
        isinstance(shape, list)
        and len(shape) in (1, 2)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        and shape[1:] in ([], [1])
    )
    if not ok:
        raise InvalidInput(f"a BYTES tensor of images is shaped [n] or [n, 1], got {quoted(shape)}")
    count: int = shape[0]
    return count


def _length_prefixed(binary: memoryview) -> list[bytes]:
    files: list[bytes] = []
    offset = 0
    while offset < len(binary):
        if offset + _LENGTH.size > len(binary):
            raise InvalidInput("BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(binary, offset)
        offset += _LENGTH.size
        if offset + length > len(binary):
            raise InvalidInput(f"BYTES element {len(files)} is cut short")
        files.append(bytes(binary[offset : offset + length]))
        offset += length
    return files


def _base64_files(data: Any) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise InvalidInput('a JSON BYTES tensor of images holds base64 strings in "data"')
    try:
        return [base64.b64decode(item, validate=True) for item in data]
    except (binascii.Error, ValueError):
        raise InvalidInput("a BYTES element is not valid base64") from None
