"""Folding a BN into the layer before it: that layer's output channels are scaled and shifted."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from foldserve.onnx_fold.graph import _Graph
from foldserve.onnx_fold.layers import (
    _add_bias_after,
    _grouped,
    _matmul_weight,
    _scale_matmul,
    _set_weight_and_bias,
    _trailing_ones,
)
from foldserve.onnx_fold.protos import Array, Float64, _attribute, _default, _set_float_attribute
from foldserve.onnx_fold.statistics import _BatchNorm

# A rule checks everything before it rewrites anything; it returns the name of the layer it
# rewrote, or None when it rewrote nothing.
_PreviousRule = Callable[[_Graph, onnx.NodeProto, _BatchNorm], str | None]


def _fold_into_previous(graph: _Graph, bn: _BatchNorm) -> str | None:
    layer = graph.producer(bn.input)
    if layer is None or not _default(layer) or not graph.feeds_only(bn.input, bn.node):
        return None
    rule = _PREVIOUS_RULES.get(layer.op_type)
    target = rule(graph, layer, bn) if rule is not None else None
    if target is None:
        return None
    # The BN's input now holds the normalized values: its producer takes over the BN's output
    # name, so graph outputs keep their names.
    producer = graph.producer(bn.input)
    assert producer is not None
    producer.output[0] = bn.output
    graph.remove_batch_norm(bn.node, by=[])
    return target


def _conv_then_bn(graph: _Graph, conv: onnx.NodeProto, bn: _BatchNorm) -> str | None:
    # Conv weights are (out, in/groups, *k): output channel c is row c.
    weight = graph.own_constant(conv, 1)
    if weight is None or weight.ndim < 3 or weight.shape[0] != bn.features:
        return None
    return _scale_outputs(graph, conv, bn, weight, bn.scale.reshape(-1, 1))


def _conv_transpose_then_bn(graph: _Graph, conv: onnx.NodeProto, bn: _BatchNorm) -> str | None:
    # ConvTranspose weights are (in, out/groups, *k): output channel g*(out/groups)+j is column j
    # of the rows of group g. (Output padding is exact too: those positions hold only the bias.)
    weight = graph.own_constant(conv, 1)
    groups = int(_attribute(conv, "group", 1))
    if weight is None or weight.ndim < 3 or weight.shape[1] * groups != bn.features:
        return None
    rows, cols = weight.shape[:2]
    if rows % groups:
        return None
    return _scale_outputs(graph, conv, bn, weight, _grouped(bn.scale, groups, rows, cols))


def _scale_outputs(
    graph: _Graph, conv: onnx.NodeProto, bn: _BatchNorm, weight: Array, factor: Float64
) -> str | None:
    bias = graph.own_optional(conv, 2, np.zeros(bn.features))
    if bias is None or bias.shape != (bn.features,):
        return None
    new_weight = weight.astype(np.float64) * _trailing_ones(factor, weight.ndim)
    new_bias = bias.astype(np.float64) * bn.scale + bn.shift
    _set_weight_and_bias(graph, conv, new_weight.astype(weight.dtype), new_bias)
    return conv.name or conv.output[0]


def _gemm_then_bn(graph: _Graph, gemm: onnx.NodeProto, bn: _BatchNorm) -> str | None:
    # Y = alpha * A' B' + beta * C with B' = B (K, N), or B.T when transB=1; the BN scales the N
    # columns: B' diag(s), and C becomes (beta * C) * s + t (so beta becomes 1).
    trans_b = bool(_attribute(gemm, "transB", 0))
    weight = graph.own_constant(gemm, 1)
    if weight is None or weight.ndim != 2 or weight.shape[0 if trans_b else 1] != bn.features:
        return None
    bias = graph.own_optional(gemm, 2, np.zeros(()))
    if bias is None or bias.ndim > 2:
        return None
    beta = float(_attribute(gemm, "beta", 1.0))
    new_bias = beta * bias.astype(np.float64) * bn.scale + bn.shift
    if new_bias.ndim > 2:
        return None  # C was not broadcastable to (M, N) after all
    factor = bn.scale[:, None] if trans_b else bn.scale[None, :]
    new_weight = (weight.astype(np.float64) * factor).astype(weight.dtype)
    _set_weight_and_bias(graph, gemm, new_weight, new_bias)
    _set_float_attribute(gemm, "beta", 1.0)
    return gemm.name or gemm.output[0]


def _matmul_then_bn(graph: _Graph, matmul: onnx.NodeProto, bn: _BatchNorm) -> str | None:
    # x W diag(s) + t: scale W's columns and add the shift after the MatMul.
    weight = _matmul_weight(graph, matmul, bn, axis=1)
    if weight is None:
        return None
    target = matmul.name or matmul.output[0]
    _scale_matmul(graph, matmul, weight, bn.scale[None, :])
    _add_bias_after(graph, matmul, bn.shift.astype(weight.dtype))
    return target


def _matmul_add_then_bn(graph: _Graph, add: onnx.NodeProto, bn: _BatchNorm) -> str | None:
    # (x W + b) s + t = x W diag(s) + (b s + t): scale W's columns, rewrite the constant b.
    for side in (0, 1):
        matmul = graph.producer(add.input[side])
        if matmul is None or matmul.op_type != "MatMul" or not _default(matmul):
            continue
        weight = _matmul_weight(graph, matmul, bn, axis=1)
        bias = graph.own_constant(add, 1 - side)
        if weight is None or bias is None or not graph.feeds_only(add.input[side], add):
            continue
        if not _is_row_vector(bias.shape, bn.features):
            continue
        _scale_matmul(graph, matmul, weight, bn.scale[None, :])
        new_bias = (bias.astype(np.float64) * bn.scale + bn.shift).astype(bias.dtype)
        graph.set_input(add, 1 - side, new_bias, absent="")
        return matmul.name or matmul.output[0]
    return None


def _conv_add_then_bn(graph: _Graph, add: onnx.NodeProto, bn: _BatchNorm) -> str | None:
    # (conv(x, W) + b) s + t = conv(x, W s) + (b s + t), per output channel: scale W's rows (and
    # the conv's own bias), rewrite the Add's constant.
    for side in (0, 1):
        conv = graph.producer(add.input[side])
        if conv is None or conv.op_type != "Conv" or not _default(conv):
            continue
        weight = graph.own_constant(conv, 1)
        bias = graph.own_constant(add, 1 - side)
        if weight is None or weight.ndim < 3 or weight.shape[0] != bn.features or bias is None:
            continue
        per_channel = _per_channel(bias, bn.features, weight.ndim)
        own_bias = graph.own_optional(conv, 2, np.zeros(bn.features))
        if per_channel is None or own_bias is None or own_bias.shape != (bn.features,):
            continue
        if not graph.feeds_only(add.input[side], add):
            continue
        scale = _trailing_ones(bn.scale.reshape(-1, 1), weight.ndim)
        new_weight = (weight.astype(np.float64) * scale).astype(weight.dtype)
        if len(conv.input) > 2 and conv.input[2]:
            _set_weight_and_bias(graph, conv, new_weight, own_bias.astype(np.float64) * bn.scale)
        else:
            graph.set_input(conv, 1, new_weight, absent="")
        new_bias = (per_channel * bn.scale + bn.shift).reshape(
            (1, bn.features) + (1,) * (weight.ndim - 2)
        )
        graph.set_input(add, 1 - side, new_bias.astype(bias.dtype), absent="")
        return conv.name or conv.output[0]
    return None


def _per_channel(bias: Array, channels: int, rank: int) -> Float64 | None:
    """A constant added to (N, C, *spatial) as one value per channel, as a (C,) vector; None when
    it varies along another axis (or over samples)."""
    if bias.ndim > rank:
        return None
    shape = (1,) * (rank - bias.ndim) + bias.shape
    if shape[0] != 1 or shape[1] not in (1, channels) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)).copy()


def _add_then_bn(graph: _Graph, add: onnx.NodeProto, bn: _BatchNorm) -> str | None:
    """A bias added after a MatMul or a Conv (exporters that keep a layer's bias apart)."""
    return _matmul_add_then_bn(graph, add, bn) or _conv_add_then_bn(graph, add, bn)


def _is_row_vector(shape: tuple[int, ...], columns: int) -> bool:
    """Whether a bias of ``shape`` broadcasts over (rows, columns) the same for every row."""
    return (
        len(shape) <= 2 and all(d == 1 for d in shape[:-1]) and shape[-1:] in ((), (1,), (columns,))
    )


_PREVIOUS_RULES: dict[str, _PreviousRule] = {
    "Conv": _conv_then_bn,
    "ConvTranspose": _conv_transpose_then_bn,
    "Gemm": _gemm_then_bn,
    "MatMul": _matmul_then_bn,
    "Add": _add_then_bn,
}
