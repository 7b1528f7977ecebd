"""The fallback placement: a BN no layer can absorb becomes ``Add(Mul(x, scale), shift)``."""

from __future__ import annotations

from onnx import helper

from foldserve.onnx_fold.graph import _Graph
from foldserve.onnx_fold.protos import _default
from foldserve.onnx_fold.statistics import _BatchNorm
from service.errors import FoldingError

_CONV_OPS = ("Conv", "ConvTranspose")


def _freeze(graph: _Graph, bn: _BatchNorm) -> None:
    """Replace the BN by ``Add(Mul(x, scale), shift)`` with (C, 1, ..., 1) constants."""
    rank = bn.rank if bn.rank is not None else _rank_from_neighbours(graph, bn)
    if rank is None or rank < 2:
        raise FoldingError(
            f"BatchNormalization {bn.name!r}: the rank of its input is unknown (shape inference "
            "could not tell), so its frozen affine cannot be shaped; export with static ranks"
        )
    shape = (bn.features,) + (1,) * (rank - 2)
    scale = graph.add_initializer(f"{bn.name}_scale", bn.scale.reshape(shape).astype(bn.dtype))
    shift = graph.add_initializer(f"{bn.name}_shift", bn.shift.reshape(shape).astype(bn.dtype))
    scaled = graph.fresh(f"{bn.name}_scaled")
    mul = helper.make_node("Mul", [bn.input, scale], [scaled], name=graph.fresh(f"{bn.name}_mul"))
    add = helper.make_node("Add", [scaled, shift], [bn.output], name=graph.fresh(f"{bn.name}_add"))
    graph.remove_batch_norm(bn.node, by=[mul, add])


def _rank_from_neighbours(graph: _Graph, bn: _BatchNorm) -> int | None:
    """When shape inference fails: the rank a Gemm or Conv-like neighbour gives the activation.

    NOTE: no guess from the graph input's rank: a Flatten in between would make the constants
    broadcast to a wrong shape without any error.
    """
    readers = [node for node in graph.consumers(bn.output) if node.input[:1] == [bn.output]]
    for node in [graph.producer(bn.input), *readers]:
        if node is None or not _default(node):
            continue
        if node.op_type == "Gemm":
            return 2
        weight = graph.constant(node.input[1]) if node.op_type in _CONV_OPS else None
        if weight is not None:
            return weight.ndim
    return None
