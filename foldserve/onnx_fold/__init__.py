"""Fold every inference-mode BatchNormalization of an ONNX model from any exporter: onnx and numpy.

Each BatchNormalization (BN), in graph order, goes to the first place that keeps the outputs exact,
as ``foldserve.fold`` does for torch modules:

1. ``folded_into_previous``: its input comes only from a Conv, a ConvTranspose, a Gemm, or a MatMul
   with a constant (K, N) weight on a 2-D activation (a MatMul or a Conv optionally through an
   Add of a constant per-channel bias); that layer's output channels are scaled and shifted.
2. ``folded_into_next``: its output feeds only a Conv that never pads, a Gemm, or a MatMul with a
   constant (K, N) weight on a 2-D activation; that layer's input channels are scaled and the
   shift becomes (part of) its bias.
3. ``frozen_affine``: otherwise it becomes ``Add(Mul(x, scale), shift)`` with constants shaped
   (C, 1, ..., 1) for the input's rank.

Identity nodes on the data path are removed first (their readers read their input), so a BN
behind one still reaches its layer. A layer is rewritten only when nothing else sees the change:
its weight and bias must be constants read by that node alone, and (folding into the previous
layer) its output must feed only the BN.
A constant is an initializer that is not also a graph input (from IR 4 on, those can be
overridden at run time), a ``Constant`` node, or an ``Identity`` of one (the legacy torch exporter
deduplicates equal initializers through Identity nodes). Rewritten tensors get new initializers;
the old ones are removed once nothing reads them. Graph input and output names, the opset and the
dynamic batch dimension are kept. Each record names the BN and the layer it went into by node
name, or by their output's original name when a node is unnamed.

Refused with ``FoldingError`` before anything is rewritten (see ``refusals``): a BN in training
mode or declaring its training outputs, a BN inside a subgraph or local function, and ops that mix
samples by reducing over axis 0. Refused while folding (see ``statistics``): a BN whose statistics
are not constants, are not finite, or have ``var + eps <= 0``.

``dynamic_batch_problem`` and ``make_batch_dynamic`` detect and fix a graph exported with a fixed
batch size, which a batching server cannot feed.

NOTE: arithmetic runs in float64 and each new tensor is cast to its dtype once, at the end.

Modules, in the order a fold uses them: ``protos`` (reading nodes, attributes, tensors), ``graph``
(the mutable view: producers, consumers, constants, ranks), ``refusals``, ``statistics`` (a BN as
a checked per-channel affine), ``placement`` (trying ``into_previous``, then ``into_next``, then
``frozen``; ``layers`` holds the weight and bias rewrites those rules share), and ``batch``.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import onnx

from foldserve.onnx_fold.batch import dynamic_batch_problem, make_batch_dynamic, re_export_advice
from foldserve.onnx_fold.graph import _Graph
from foldserve.onnx_fold.placement import _fold_one
from foldserve.onnx_fold.protos import _is_batch_norm
from foldserve.onnx_fold.refusals import _refuse_batch_statistics
from service.errors import FoldingError
from service.store import BatchNormRecord

__all__ = [
    "OnnxFoldResult",
    "dynamic_batch_problem",
    "fold_onnx_batch_norms",
    "make_batch_dynamic",
    "re_export_advice",
]


@dataclass(frozen=True)
class OnnxFoldResult:
    model: onnx.ModelProto  # checked with onnx.checker, no BatchNormalization left
    records: tuple[BatchNormRecord, ...]  # one per BatchNormalization, in graph order


def fold_onnx_batch_norms(model: onnx.ModelProto) -> OnnxFoldResult:
    """Fold or freeze every BatchNormalization of a copy of ``model``; ``model`` is untouched."""
    _check(model, "the input model is not valid ONNX")
    work = deepcopy(model)
    graph = _Graph(work)
    graph.bypass_identities()
    _refuse_batch_statistics(work, graph)
    records = tuple(_fold_one(graph, node) for node in graph.batch_norms())
    graph.write_back(work)
    _check(work, "BUG: folding produced an invalid model")
    left = [node.name or node.output[0] for node in work.graph.node if _is_batch_norm(node)]
    if left:
        raise FoldingError(f"BatchNormalization nodes left after folding: {', '.join(left)}")
    return OnnxFoldResult(model=work, records=records)


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise FoldingError(f"{what}: {exc}") from exc
