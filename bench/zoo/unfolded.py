"""The unfolded baseline: the eval-mode model as ONNX with every BatchNormalization op kept.

``foldserve.serialize.export_onnx(model.eval(), example, optimize=False)``, with one repair: torch
2.13's exporter, unoptimized, gives each bias-free Conv a zero bias computed at run time
(Shape -> Expand -> CastLike -> Expand). For Conv3d that bias comes out with the wrong shape and
onnxruntime refuses to run the file; for Conv2d it runs, but onnxruntime then cannot fuse the
BatchNormalization into the Conv (its fusion wants a constant bias or none). The repair drops
those computed biases (an absent bias is zero), which is what the baseline is meant to be: a file
whose BNs onnxruntime is free to fuse into the convolutions before them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

CONVOLUTIONS = frozenset({"Conv", "ConvTranspose"})


@dataclass(frozen=True)
class Unfolded:
    model: bytes
    batchnorm_ops: int
    computed_biases_dropped: int
    via: str  # what was exported: the module, or (when torch.export refuses it) its fx trace


def export(model: nn.Module, example: torch.Tensor) -> Unfolded:
    from foldserve.serialize import export_onnx
    from foldserve.several import Named, default_name, found_outputs
    from foldserve.tensors import INPUT_NAME, OUTPUT_NAME

    model.eval()
    with torch.no_grad():
        keys = [key for key, _ in found_outputs(model(example))]
    names = [default_name(key) for key in keys]
    if keys != [()]:  # not one bare tensor: a tuple, named as foldserve.export names them
        model = Named(model, 1, keys)
    else:
        names = [OUTPUT_NAME]
    try:
        exported, via = export_onnx(model, example, False, (INPUT_NAME,), names), "module"
    except Exception:
        # NOTE: torch.export refuses Python branches on tensor values (DiNTS tests a tensor
        # of its topology in forward); torch.fx evaluates them while tracing, as foldserve's
        # own fold does, and the traced module keeps every BatchNorm.
        traced = torch.fx.symbolic_trace(model)
        exported, via = export_onnx(traced, example, False, (INPUT_NAME,), names), "fx trace"
    proto = onnx.load_model_from_string(exported)
    dropped = drop_computed_zero_biases(proto.graph)
    ops = Counter(node.op_type for node in proto.graph.node)
    return Unfolded(proto.SerializeToString(), ops["BatchNormalization"], dropped, via)


def drop_computed_zero_biases(graph: onnx.GraphProto) -> int:
    """Remove each Conv bias computed as Expand(CastLike(0, x), shape); return how many."""
    producers = {output: node for node in graph.node for output in node.output}
    dropped = 0
    for node in graph.node:
        bias = node.input[2] if node.op_type in CONVOLUTIONS and len(node.input) == 3 else None
        if bias and _is_zero_expand(producers.get(bias), producers):
            del node.input[2]
            dropped += 1
    _remove_dead_nodes(graph)
    return dropped


def _is_zero_expand(node: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto]) -> bool:
    if node is None or node.op_type != "Expand":
        return False
    cast = producers.get(node.input[0])
    if cast is None or cast.op_type != "CastLike":
        return False
    constant = producers.get(cast.input[0])
    if constant is None or constant.op_type != "Constant":
        return False
    values = [numpy_helper.to_array(a.t) for a in constant.attribute if a.name == "value"]
    return len(values) == 1 and not np.any(values[0])


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {name for node in graph.node for name in node.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
