"""One BN's statistics as a per-channel affine, read as constants and checked before folding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from foldserve.onnx_fold.graph import _Graph
from foldserve.onnx_fold.protos import Array, Float64, _attribute
from service.errors import FoldingError


@dataclass(frozen=True)
class _BatchNorm:
    """One BN: ``y = x * scale + shift`` per channel (float64), and what placing it needs."""

    node: onnx.NodeProto
    name: str
    scale: Float64
    shift: Float64
    rank: int | None  # of the input, from shape inference
    dtype: np.dtype[Any]  # of the input

    @property
    def features(self) -> int:
        return len(self.scale)

    @property
    def input(self) -> str:
        return str(self.node.input[0])

    @property
    def output(self) -> str:
        return str(self.node.output[0])


def _statistics(
    graph: _Graph, node: onnx.NodeProto, name: str
) -> tuple[tuple[Float64, Float64, Float64, Float64, Float64], np.dtype[Any]]:
    """(mean, var, eps, scale, bias) in float64 and the input dtype; refuses what cannot fold."""
    arrays: dict[str, Array] = {}
    for label, tensor in zip(("scale", "bias", "mean", "var"), node.input[1:5], strict=False):
        value = graph.constant(tensor) if tensor else None
        if value is None:
            raise FoldingError(
                f"BatchNormalization {name!r}: its {label} ({tensor!r}) is not a constant "
                "(an initializer or Constant node), so its statistics cannot be frozen"
            )
        arrays[label] = value
    shapes = {value.shape for value in arrays.values()}
    if len(arrays) != 4 or len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise FoldingError(
            f"BatchNormalization {name!r}: scale, bias, mean and var must be four 1-D constants "
            f"of one length, got shapes {[value.shape for value in arrays.values()]}"
        )
    # NOTE: the attribute is a float32; its shortest decimal (1e-05, not 9.99999974e-06) is what
    # the exporter was given, and hashing that keeps stats_sha256 equal to foldserve.fold's.
    eps = np.array([float(str(np.float32(_attribute(node, "epsilon", 1e-5))))])
    as_f64 = {label: value.astype(np.float64) for label, value in arrays.items()}
    for label, value in (*as_f64.items(), ("epsilon", eps)):
        if not np.isfinite(value).all():
            raise FoldingError(f"BatchNormalization {name!r} has non-finite values in {label}")
    if not (as_f64["var"] + eps > 0).all():
        raise FoldingError(f"BatchNormalization {name!r} has var + epsilon <= 0")
    elem_type = graph.elem_types.get(node.input[0])
    dtype = helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else arrays["scale"].dtype
    stats = (as_f64["mean"], as_f64["var"], eps, as_f64["scale"], as_f64["bias"])
    return stats, dtype
