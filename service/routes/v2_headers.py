"""The JSON headers of binary V2 requests, parsed and checked once per distinct text, and those
of binary answers, written once per shape.

NOTE: a client sending binary tensors sends the same header again and again (tritonclient,
perf_analyzer, the KServe SDK: the same shape, datatype and parameters each time, and no ``id``
unless asked): parsing it, checking it against the model's input and deciding the output form
was a fifth of a 64-row request's CPU (about 25 us of ~110 in-process). Everything kept here is
a function of the header's bytes and of what they were checked against (the path's model and
version, the input and output specs), so a header seen before gives the same answer: a header
that fails to parse is not kept, and what is checked against a model's input is kept only once
it passed (a header the input refuses is checked, and refused, every time). Headers with an
``id`` (one per request, as a rule) and long ones are not kept; the table is bounded and
forgets the oldest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput
from service.packing import Signature
from service.routes.responses import quoted

MAX_HEADERS = 256  # distinct headers kept per codec (a few per model and client in practice)
MAX_TEXT_BYTES = 2048  # longer headers are parsed every time


@dataclass(frozen=True, slots=True)
class BinaryInput:
    """Where a binary input's rows are in the body, checked against the model's input."""

    name: str
    index: int  # of the model's input, in the manifest's order
    dtype: str  # the wire's little-endian dtype
    shape: tuple[int, ...]  # the whole tensor, rows first
    size: int  # bytes
    offset: int  # where its bytes start in the binary part

    def rows(self, binary: memoryview) -> np.ndarray:
        rows = np.frombuffer(
            binary,
            dtype=self.dtype,
            count=self.size // np.dtype(self.dtype).itemsize,
            offset=self.offset,
        )
        if not rows.flags.aligned:  # the JSON header's length puts the numbers anywhere
            rows = rows.copy()
        return rows.reshape(self.shape)


@dataclass(frozen=True, slots=True)
class BinaryInputs:
    """The binary inputs of a request in the order their bytes come, and the bytes they need:
    exactly what follows the JSON header."""

    inputs: tuple[BinaryInput, ...]
    size: int

    def rows(self, binary: memoryview) -> list[np.ndarray]:
        """Each binary input's rows, in the order their bytes come."""
        if len(binary) != self.size:
            if not self.inputs:
                raise InvalidInput(
                    f"{len(binary)} bytes follow the JSON header but no input is binary"
                )
            told = (
                f"input {self.inputs[0].name!r}: binary_data_size is {self.size}"
                if len(self.inputs) == 1
                else f"the binary inputs' binary_data_size add up to {self.size}"
            )
            raise InvalidInput(f"{told} but {len(binary)} bytes follow the JSON header")
        return [binary_input.rows(binary) for binary_input in self.inputs]


# The outputs an answer holds, in its order: (the output's index in the manifest, as raw bytes).
ChosenOutputs = tuple[tuple[int, bool], ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a header said, checked against one version's tensors: where each input's bytes are
    (every input binary) and the outputs to answer with."""

    inputs: BinaryInputs
    outputs: ChosenOutputs

    def rows(self, binary: memoryview) -> list[np.ndarray]:
        """Every input's rows, in the manifest's order."""
        arrays = self.inputs.rows(binary)
        if len(arrays) == 1:
            return arrays
        ordered: list[np.ndarray] = [arrays[0]] * len(arrays)
        for binary_input, rows in zip(self.inputs.inputs, arrays, strict=True):
            ordered[binary_input.index] = rows
        return ordered


@dataclass(slots=True)
class Header:
    """A JSON header as parsed (``payload`` is never changed once made) and what it said."""

    payload: dict[str, Any]
    text: bytes
    version: int | None  # the version to run, the path's and the body's agreed
    timeout_s: float | None
    request_id: str | None
    # the tensors of the version it was checked against -> what it says for them
    plans: dict[Signature, Plan] = field(default_factory=dict)


def binary_size(tensor: dict[str, Any]) -> int | None:
    """The tensor's ``parameters.binary_data_size`` (None: its data is JSON)."""
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    size = parameters.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InvalidInput(f"binary_data_size must be a byte count, got {quoted(size)}")
    return size


class HeaderMemo:
    """Headers by (text, path's model name, path's version); the event loop's alone."""

    def __init__(self, capacity: int = MAX_HEADERS) -> None:
        self._capacity = capacity
        self._headers: dict[tuple[bytes, str, int | None], Header] = {}

    def get(self, text: bytes, name: str, number: int | None) -> Header | None:
        return self._headers.get((text, name, number))

    def keep(self, header: Header, name: str, number: int | None) -> None:
        if header.request_id is not None or len(header.text) > MAX_TEXT_BYTES:
            return
        headers = self._headers
        if len(headers) >= self._capacity:
            del headers[next(iter(headers))]  # the oldest (dicts keep insertion order)
        headers[(header.text, name, number)] = header


class AnswerHeaders:
    """The JSON header of a binary answer without an ``id``: the same bytes for every answer of
    one version's output of one shape, written once (orjson and the dict it reads were a few
    microseconds of every request)."""

    def __init__(self, capacity: int = MAX_HEADERS) -> None:
        self._capacity = capacity
        self._headers: dict[tuple[str, int, str, tuple[int, ...]], bytes] = {}

    def header(self, model: str, version: int, output: str, shape: tuple[int, ...]) -> bytes:
        key = (model, version, output, shape)
        text = self._headers.get(key)
        if text is None:
            text = answer_header(model, version, output, shape, None)
            if len(self._headers) >= self._capacity:
                del self._headers[next(iter(self._headers))]
            self._headers[key] = text
        return text


def answer_header(
    model: str, version: int, output: str, shape: tuple[int, ...], request_id: str | None
) -> bytes:
    """The JSON header of a binary answer of one FP32 output (its bytes follow it)."""
    size = 4 * math.prod(shape)
    tensor: dict[str, Any] = {"name": output, "datatype": "FP32", "shape": shape}
    tensor["parameters"] = {"binary_data_size": size}
    answer: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        answer["id"] = request_id
    answer["outputs"] = [tensor]
    return orjson.dumps(answer)
