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
    """How the tensors named by ``specs`` make one row per sample.

    Tensors all float32 (the usual case) sit side by side as float32 values; tensors of other
    dtypes (uint8 pixels, int64 ids) as their bytes, in rows of uint8.
    """

    __slots__ = (
        "bounds",
        "dtype",
        "names",
        "nbytes",
        "row_shape",
        "single",
        "specs",
        "value_bounds",
        "values",
    )

    def __init__(self, specs: tuple[TensorSpec, ...]) -> None:
        if not specs:
            raise ValueError("a model has at least one input and one output")
        self.specs = specs
        self.names = tuple(spec.name for spec in specs)
        self.single = len(specs) == 1
        sizes = [math.prod(spec.shape) for spec in specs]
        itemsizes = [np.dtype(spec.dtype).itemsize for spec in specs]
        self.values = sum(sizes)  # per sample
        self.nbytes = sum(n * i for n, i in zip(sizes, itemsizes, strict=True))  # per sample
        self.value_bounds = _bounds(sizes)
        as_floats = all(spec.dtype == "float32" for spec in specs)
        # The dtype of the rows: the one tensor's own, float32 values, or bytes.
        self.dtype = np.dtype(specs[0].dtype if self.single else "float32" if as_floats else "u1")
        if self.single or as_floats:
            self.bounds = self.value_bounds
        else:
            self.bounds = _bounds([n * i for n, i in zip(sizes, itemsizes, strict=True)])
        self.row_shape = specs[0].shape if self.single else (self.bounds[-1][1],)

    def pack(self, tensors: Sequence[Array]) -> Array:
        """One row per sample from one array per tensor (in ``specs`` order, same sample count,
        each of its spec's dtype)."""
        if self.single:
            return tensors[0]
        counts = {len(tensor) for tensor in tensors}
        if len(counts) != 1:
            shown = ", ".join(f"{n!r}: {len(t)}" for n, t in zip(self.names, tensors, strict=True))
            raise InvalidInput(f"every input must hold as many samples ({shown})")
        n = counts.pop()
        flat = [np.ascontiguousarray(tensor).reshape(n, -1) for tensor in tensors]
        if self.dtype == np.uint8:
            flat = [part.view(np.uint8) for part in flat]
        return np.concatenate(flat, axis=1)

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
        spec = self.specs[index]
        part = np.ascontiguousarray(rows.reshape(len(rows), -1)[:, start:stop])
        if self.dtype == np.uint8:
            part = part.view(spec.dtype)
        return part.reshape(len(rows), *spec.shape)

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
        flat = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
        tensors = [
            flat[:, start:stop].astype(spec.dtype).reshape(len(flat), *spec.shape)
            for (start, stop), spec in zip(self.value_bounds, self.specs, strict=True)
        ]
        return self.pack(tensors)

    def values_of(self, rows: Array) -> list[list[float]]:
        """Rows as flat per-sample values, each tensor's side by side (``rows``' inverse)."""
        parts = [part.reshape(len(rows), -1) for part in self.unpack(rows)]
        flat = np.concatenate([part.astype(np.float64) for part in parts], axis=1)
        return flat.tolist()  # type: ignore[no-any-return]


def _bounds(sizes: list[int]) -> tuple[tuple[int, int], ...]:
    ends = np.cumsum(sizes).tolist()
    return tuple(zip([0, *ends[:-1]], ends, strict=True))


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
