"""The tensors of one side of a model (its inputs, or its outputs) as one float32 row per sample.

A model with several named inputs or outputs is batched like a model with one: each sample's
tensors, flattened in the manifest's order and put side by side, make one row. The batcher, the
admission's row counts, the load-time checks and the golden samples of the manifest all see one
array whose rows are samples, so the rows of every input of a request can never be separated or
mixed with another request's; only the backend (which feeds the runtime by name) and the
protocols (which read and write tensors by name) take the rows apart.

NOTE: a model with one input (or output) is not repacked at all: its rows keep the tensor's own
shape, the arrays pass through untouched, and the request path costs what it cost before.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.backends import Array
from service.errors import BackendError, InvalidInput
from service.store import Manifest, TensorSpec


class Packing:
    """How the tensors named by ``specs`` make one row per sample."""

    __slots__ = ("bounds", "names", "row_shape", "single", "specs", "values")

    def __init__(self, specs: tuple[TensorSpec, ...]) -> None:
        if not specs:
            raise ValueError("a model has at least one input and one output")
        self.specs = specs
        self.names = tuple(spec.name for spec in specs)
        self.single = len(specs) == 1
        sizes = [math.prod(spec.shape) for spec in specs]
        ends = list(np.cumsum(sizes).tolist())
        self.bounds = tuple(zip([0, *ends[:-1]], ends, strict=True))
        self.values = sum(sizes)  # per sample
        self.row_shape = specs[0].shape if self.single else (self.values,)

    def pack(self, tensors: Sequence[Array]) -> Array:
        """One row per sample from one array per tensor (in ``specs`` order, same sample count)."""
        if self.single:
            return tensors[0]
        counts = {len(tensor) for tensor in tensors}
        if len(counts) != 1:
            shown = ", ".join(f"{n!r}: {len(t)}" for n, t in zip(self.names, tensors, strict=True))
            raise InvalidInput(f"every input must hold as many samples ({shown})")
        n = counts.pop()
        return np.concatenate([tensor.reshape(n, -1) for tensor in tensors], axis=1)

    def unpack(self, rows: Array) -> list[Array]:
        """One C-contiguous array per tensor, shaped ``(n, *spec.shape)``."""
        if self.single:
            return [rows]
        return [self.part(rows, index) for index in range(len(self.specs))]

    def part(self, rows: Array, index: int) -> Array:
        """The tensor ``index`` of every row."""
        if self.single:
            return rows
        start, stop = self.bounds[index]
        part = np.ascontiguousarray(rows.reshape(len(rows), -1)[:, start:stop])
        return part.reshape(len(rows), *self.specs[index].shape)

    def from_runtime(self, results: Sequence[object]) -> Array:
        """The runtime's outputs (one array per tensor, in ``specs`` order) as float32 rows,
        each checked against its spec: a mismatch is the model's fault, never a request's."""
        arrays = [np.asarray(result, dtype=np.float32) for result in results]
        if self.single:
            return arrays[0]
        for spec, array in zip(self.specs, arrays, strict=True):
            if array.shape[1:] != spec.shape or len(array) != len(arrays[0]):
                raise BackendError(
                    f"output {spec.name!r} came back shaped {array.shape}: the manifest says "
                    f"{spec.shape} per sample, as many samples as every other output"
                )
        return self.pack(arrays)

    def rows(self, values: Sequence[Sequence[float]]) -> Array:
        """Flat per-sample values (the manifest's golden samples) as rows."""
        return np.asarray(values, dtype=np.float32).reshape(-1, *self.row_shape)


@functools.cache
def packing(specs: tuple[TensorSpec, ...]) -> Packing:
    """The one Packing of these specs (kept: a manifest's are asked for on every load and check)."""
    return Packing(specs)


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, as the runtime is fed and read."""

    inputs: Packing
    outputs: Packing

    @classmethod
    def of(cls, manifest: Manifest) -> Signature:
        return cls(packing(manifest.inputs), packing(manifest.outputs))
