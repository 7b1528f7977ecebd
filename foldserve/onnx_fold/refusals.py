"""Refused before anything is rewritten: training-mode BN, nested BN, batch-axis reductions."""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from foldserve.onnx_fold.batch_probe import probed_batch_axes
from foldserve.onnx_fold.graph import _Graph
from foldserve.onnx_fold.protos import (
    _attribute,
    _default,
    _default_opset,
    _is_batch_norm,
    _subgraphs,
)
from service.errors import FoldingError

_REDUCTIONS = frozenset(
    {
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
    }
)
_RE_EXPORT = "re-export the model in eval mode (model.eval(); torch.onnx.export(...))"


def _refuse_batch_statistics(model: onnx.ModelProto, graph: _Graph) -> None:
    """Refuse every op whose output for one sample depends on the other samples of its batch.

    Covered: BatchNormalization in training mode; BatchNormalization in a subgraph or function
    (not folded here); Reduce* ops, ArgMax/ArgMin and MeanVarianceNormalization whose axes include
    the batch axis, or that reduce every axis, on an input of rank >= 2 or unknown rank. The
    batch axis is where ONNX shape inference follows a symbolic batch, else where onnxruntime
    finds it at three batch sizes (``batch_probe``), else axis 0. Rank-1 inputs are
    allowed: they are shape vectors far more often than per-sample scalars. A negative axis counts
    as 0 only where the rank is known. Per-sample normalizations (Instance-, Group-,
    LayerNormalization) are fine. Not covered: other ops that can mix samples (e.g. Softmax with
    axis=0, Transpose moving the batch axis); the server's batch-invariance checks catch those.
    """
    opset = _default_opset(model)
    _probe_lost_batch_axes(model, graph)
    for node in graph.nodes:
        _refuse_sample_mixing(graph, node, graph.ranks.get(node.input[0]) if node.input else None)
        if _is_batch_norm(node):
            _refuse_training_mode(node, opset)
        for subgraph in _subgraphs(node):
            _refuse_nested(graph, subgraph.node, f"a subgraph of {node.op_type} {node.name!r}")
    for function in model.functions:
        _refuse_nested(graph, function.node, f"local function {function.name!r}")


def _probe_lost_batch_axes(model: onnx.ModelProto, graph: _Graph) -> None:
    """Ask onnxruntime where the batch is for the reductions whose input shape inference could
    not follow (one session, three runs; none when inference followed them all)."""
    lost = []
    for node in graph.nodes:
        if not node.input or not _default(node) or node.input[0] in graph.batch_axes:
            continue
        try:
            axes = _reduced_axes(graph, node)
        except FoldingError:
            continue  # refused in the main pass, with its reason
        if isinstance(axes, list):
            lost.append(node.input[0])
    if lost:
        graph.batch_axes.update(probed_batch_axes(model, lost))


def _refuse_nested(graph: _Graph, nodes: Iterable[onnx.NodeProto], where: str) -> None:
    for node in nodes:
        if node.op_type == "BatchNormalization":
            raise FoldingError(
                f"BatchNormalization {node.name or node.output[0]!r} in {where} is not supported: "
                "inline it into the main graph first (onnx.inliner.inline_local_functions)"
            )
        _refuse_sample_mixing(graph, node, rank=None)
        for subgraph in _subgraphs(node):
            _refuse_nested(graph, subgraph.node, where)


def _refuse_training_mode(node: onnx.NodeProto, opset: int) -> None:
    name = node.name or node.output[0]
    if _attribute(node, "training_mode", 0) == 1 or (
        opset < 7 and not _attribute(node, "is_test", 0)
    ):
        raise FoldingError(
            f"BatchNormalization {name!r} runs in training mode: it normalizes with the statistics "
            f"of each batch, so a sample's output depends on its batch mates; {_RE_EXPORT}"
        )
    # Per the spec, running and saved statistics are outputs only in training mode; before opset 14
    # onnxruntime even switches to batch statistics when they are declared.
    extra = [output for output in node.output[1:] if output]
    if extra:
        raise FoldingError(
            f"BatchNormalization {name!r} declares training outputs {extra} (running or saved "
            f"statistics), which exist only in training mode; {_RE_EXPORT}"
        )
    if _attribute(node, "spatial", 1) == 0:
        raise FoldingError(f"BatchNormalization {name!r} has spatial=0, which is not supported")


def _refuse_sample_mixing(graph: _Graph, node: onnx.NodeProto, rank: int | None) -> None:
    if not _default(node) or (rank is not None and rank < 2):
        return
    axes = _reduced_axes(graph, node)
    if axes is None:
        return
    # Axis 0 unless shape inference followed the batch elsewhere (e.g. behind a stack).
    batch = graph.batch_axes.get(node.input[0], 0)
    if axes == "all" or any(
        axis == batch or (rank is not None and axis == batch - rank) for axis in axes
    ):
        raise FoldingError(
            f"{node.op_type} {node.name or node.output[0]!r} reduces over axis {batch}, the "
            "batch axis: each sample's output would depend on its batch mates"
        )


def _reduced_axes(graph: _Graph, node: onnx.NodeProto) -> list[int] | str | None:
    """The axes ``node`` reduces over, "all", or None if it reduces nothing across samples."""
    if node.op_type in ("ArgMax", "ArgMin"):
        return [int(_attribute(node, "axis", 0))]
    if node.op_type == "MeanVarianceNormalization":
        return [int(axis) for axis in _attribute(node, "axes", [0, 2, 3])]
    if node.op_type not in _REDUCTIONS:
        return None
    axes = _attribute(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = graph.constant_expression(node.input[1])
        if value is None:
            raise FoldingError(
                f"{node.op_type} {node.name or node.output[0]!r} takes its axes at run time: "
                "cannot prove it never reduces over the batch axis"
            )
        axes = value.reshape(-1).tolist()
    if not axes:
        return None if _attribute(node, "noop_with_empty_axes", 0) else "all"
    return [int(axis) for axis in axes]
