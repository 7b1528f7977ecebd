"""Folding a BN into the layer after it: its input channels are scaled, the shift joins its bias."""

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
from foldserve.onnx_fold.protos import _attribute, _default, _set_float_attribute
from foldserve.onnx_fold.statistics import _BatchNorm

# A rule checks everything before it rewrites anything; it returns whether it rewrote the layer.
_NextRule = Callable[[_Graph, _BatchNorm, onnx.NodeProto], bool]


def _fold_into_next(graph: _Graph, bn: _BatchNorm) -> str | None:
    consumers = graph.consumers(bn.output)
    if len(consumers) != 1 or graph.uses(bn.output) != 1:
        return None
    (layer,) = consumers
    rule = _NEXT_RULES.get(layer.op_type)
    if rule is None or not _default(layer) or layer.input[0] != bn.output:
        return None
    target = layer.name or layer.output[0]
    if not rule(graph, bn, layer):
        return None
    layer.input[0] = bn.input
    graph.remove_batch_norm(bn.node, by=[])
    return target


def _bn_then_conv(graph: _Graph, bn: _BatchNorm, conv: onnx.NodeProto) -> bool:
    # Exact only without zero padding: a zero pad of the normalized signal is not the normalized
    # zero pad. Conv weights are (out, in/groups, *k); row o reads input channel g*(in/groups)+j
    # in column j, g being o's group. The shift's response is summed over columns and kernel.
    weight = graph.own_constant(conv, 1)
    groups = int(_attribute(conv, "group", 1))
    if weight is None or weight.ndim < 3 or not _never_pads(conv):
        return False
    rows, cols = weight.shape[:2]
    if cols * groups != bn.features or rows % groups:
        return False
    bias = graph.own_optional(conv, 2, np.zeros(rows))
    if bias is None or bias.shape != (rows,):
        return False
    w64 = weight.astype(np.float64)
    scale = _trailing_ones(_grouped(bn.scale, groups, rows, cols), weight.ndim)
    shift = _trailing_ones(_grouped(bn.shift, groups, rows, cols), weight.ndim)
    new_bias = bias.astype(np.float64) + (w64 * shift).reshape(rows, -1).sum(axis=1)
    _set_weight_and_bias(graph, conv, (w64 * scale).astype(weight.dtype), new_bias)
    return True


def _never_pads(conv: onnx.NodeProto) -> bool:
    auto_pad = _attribute(conv, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return True
    return auto_pad == "NOTSET" and all(p == 0 for p in _attribute(conv, "pads", []))


def _bn_then_gemm(graph: _Graph, bn: _BatchNorm, gemm: onnx.NodeProto) -> bool:
    # alpha (x s + t) B' + beta C = alpha x (diag(s) B') + (beta C + alpha t B'), so beta -> 1.
    if _attribute(gemm, "transA", 0):
        return False  # the BN's channels would be the Gemm's rows
    trans_b = bool(_attribute(gemm, "transB", 0))
    weight = graph.own_constant(gemm, 1)
    if weight is None or weight.ndim != 2 or weight.shape[1 if trans_b else 0] != bn.features:
        return False
    bias = graph.own_optional(gemm, 2, np.zeros(()))
    if bias is None or bias.ndim > 2:
        return False
    w64 = weight.astype(np.float64)
    alpha, beta = float(_attribute(gemm, "alpha", 1.0)), float(_attribute(gemm, "beta", 1.0))
    new_bias = beta * bias.astype(np.float64) + alpha * (bn.shift @ (w64.T if trans_b else w64))
    if new_bias.ndim > 2:
        return False
    factor = bn.scale[None, :] if trans_b else bn.scale[:, None]
    _set_weight_and_bias(graph, gemm, (w64 * factor).astype(weight.dtype), new_bias)
    _set_float_attribute(gemm, "beta", 1.0)
    return True


def _bn_then_matmul(graph: _Graph, bn: _BatchNorm, matmul: onnx.NodeProto) -> bool:
    # (x s + t) W = x (diag(s) W) + t W: scale W's rows, add t W after the MatMul.
    weight = _matmul_weight(graph, matmul, bn, axis=0)
    if weight is None:
        return False
    shift_response = (bn.shift @ weight.astype(np.float64)).astype(weight.dtype)
    _scale_matmul(graph, matmul, weight, bn.scale[:, None])
    _add_bias_after(graph, matmul, shift_response)
    return True


_NEXT_RULES: dict[str, _NextRule] = {
    "Conv": _bn_then_conv,
    "Gemm": _bn_then_gemm,
    "MatMul": _bn_then_matmul,
}
