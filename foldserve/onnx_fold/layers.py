"""Rewriting a layer's constant weight and bias, shared by the previous- and next-layer rules."""

from __future__ import annotations

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

from foldserve.onnx_fold.graph import _Graph
from foldserve.onnx_fold.protos import Array, Float64
from foldserve.onnx_fold.statistics import _BatchNorm


def _trailing_ones(factor: Float64, ndim: int) -> Float64:
    """``factor`` with unit dims appended up to ``ndim``, to broadcast over a kernel."""
    return factor.reshape(factor.shape + (1,) * (ndim - factor.ndim))


def _grouped(vector: Float64, groups: int, rows: int, cols: int) -> Float64:
    """Lay a per-channel vector over a grouped weight's first two dims, (rows, cols).

    Row r belongs to group ``r // (rows / groups)``; its column j is channel ``group * cols + j``.
    """
    group = np.arange(rows) // (rows // groups)
    channel: NDArray[np.intp] = group[:, None] * cols + np.arange(cols)[None, :]
    return np.take(vector, channel)


def _add_bias_after(graph: _Graph, matmul: onnx.NodeProto, bias: Array) -> None:
    """Make ``matmul``'s output name be ``MatMul(...) + bias``, through a new Add node."""
    bias_name = graph.add_initializer(f"{matmul.input[1]}_bias", bias)
    product = graph.fresh(f"{matmul.output[0]}_unbiased")
    name = graph.fresh(f"{matmul.name or matmul.output[0]}_bias")
    add = helper.make_node("Add", [product, bias_name], [matmul.output[0]], name=name)
    matmul.output[0] = product
    graph.insert_after(matmul, add)


def _set_weight_and_bias(graph: _Graph, layer: onnx.NodeProto, weight: Array, bias: Array) -> None:
    """Inputs 1 and 2 of a Conv or Gemm; the bias takes the weight's dtype, as the op requires."""
    graph.set_input(layer, 2, bias.astype(weight.dtype), absent=f"{layer.input[1]}_bias")
    graph.set_input(layer, 1, weight, absent="")


def _matmul_weight(
    graph: _Graph, matmul: onnx.NodeProto, bn: _BatchNorm, axis: int
) -> Array | None:
    """The MatMul's own constant (K, N) weight whose ``axis`` holds the BN's channels.

    NOTE: only on a 2-D activation (rank known): on (B, T, K) the BN's channel axis 1 is T.
    """
    weight = graph.own_constant(matmul, 1)
    if bn.rank != 2 or weight is None or weight.ndim != 2 or weight.shape[axis] != bn.features:
        return None
    return weight


def _scale_matmul(graph: _Graph, matmul: onnx.NodeProto, weight: Array, factor: Float64) -> None:
    new_weight = (weight.astype(np.float64) * factor).astype(weight.dtype)
    graph.set_input(matmul, 1, new_weight, absent="")
