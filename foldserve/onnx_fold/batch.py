"""The batch dimension: detect a graph exported with a fixed batch size, and make it dynamic."""

from __future__ import annotations

from copy import deepcopy

import onnx

from foldserve.onnx_fold.graph import _Graph, _real_inputs
from foldserve.onnx_fold.protos import _default
from service.errors import FoldingError


def dynamic_batch_problem(model: onnx.ModelProto) -> str | None:
    """None when every graph input's dim 0 is symbolic or unknown, else what to do about it."""
    for value in _real_inputs(model.graph):
        batch = _fixed_batch(value)
        if batch is not None:
            return _fixed_batch_message(model, value.name, batch)
    return None


def re_export_advice(model: onnx.ModelProto) -> str:
    """How the exporter that wrote ``model`` (its ``producer_name``) makes the batch dynamic."""
    producer = model.producer_name.lower()
    inputs = _real_inputs(model.graph)
    name = inputs[0].name if inputs else "input"
    if producer.startswith("pytorch"):
        return (
            "re-export with a dynamic batch: torch.onnx.export(..., dynamo=True, "
            f"dynamic_shapes=...) or, with the legacy exporter, dynamic_axes={{{name!r}: "
            "{0: 'batch'}} for the input and the output"
        )
    if producer in ("tf2onnx", "keras2onnx"):
        return (
            "re-export with a dynamic batch: leave the batch out of the Keras Input (no "
            "batch_size) or give tf.TensorSpec((None, ...)), or pass tf2onnx --inputs "
            f"{name}[-1,...]"
        )
    if producer == "paddle2onnx":
        return (
            "re-export with a dynamic batch: save the model with paddle.static.InputSpec"
            "(shape=[None, ...]) and do not fix the input shape in paddle2onnx"
        )
    if producer in ("skl2onnx", "onnxmltools"):
        return "re-export with a dynamic batch: initial_types with None as the batch dimension"
    return "re-export with a dynamic (symbolic) batch dimension on every input and output"


def make_batch_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs and outputs have the symbolic dim 0 ``"batch"``.

    What is checked, on the main graph only: no Reshape of run-time data has a constant target
    shape starting with the old fixed batch size (the usual way an exporter bakes the batch in,
    e.g. ``x.view(1, -1)``), and shape inference with the symbolic batch derives no fixed dim 0
    for any output. Other ways to bake it in (Expand, Tile, ConstantOfShape, Slice with constant
    ends, subgraphs) are not looked for: run the result on batches of several sizes.
    """
    result = deepcopy(model)
    inputs = _real_inputs(result.graph)
    batches = {batch for batch in map(_fixed_batch, inputs) if batch is not None}
    if not batches:
        return result
    for value in (*inputs, *result.graph.output):
        shape = value.type.tensor_type.shape
        if value.type.HasField("tensor_type") and shape.dim:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = "batch"
    del result.graph.value_info[:]  # hints recorded with the old fixed batch
    advice = _fixed_batch_message(model, inputs[0].name, min(batches))
    _refuse_baked_reshape(result, batches, advice)
    _refuse_fixed_output_batch(result, advice)
    return result


def _fixed_batch(value: onnx.ValueInfoProto) -> int | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.shape.dim:
        return None
    dim = value.type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def _fixed_batch_message(model: onnx.ModelProto, name: str, batch: int) -> str:
    return f"input {name!r} has a fixed batch dimension of {batch}: {re_export_advice(model)}"


def _refuse_baked_reshape(model: onnx.ModelProto, batches: set[int], advice: str) -> None:
    graph = _Graph(model)
    for node in graph.nodes:
        if node.op_type != "Reshape" or not _default(node) or len(node.input) < 2:
            continue
        if graph.constant(node.input[0]) is not None:
            continue  # reshaping a weight cannot involve the batch
        shape = graph.constant(node.input[1])
        if shape is not None and shape.size and int(shape.reshape(-1)[0]) in batches:
            raise FoldingError(
                f"Reshape {node.name or node.output[0]!r} hard-codes the batch size in its "
                f"target shape {shape.tolist()}, so the graph cannot be made batch-dynamic "
                f"safely; {advice}"
            )


def _refuse_fixed_output_batch(model: onnx.ModelProto, advice: str) -> None:
    probe = deepcopy(model)
    for value in probe.graph.output:
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")  # let inference fill it in
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # onnx raises several types; nothing is learned, the Reshape scan stands
        return
    for value in inferred.graph.output:
        batch = _fixed_batch(value)
        if batch is not None:
            raise FoldingError(
                f"with a symbolic batch, output {value.name!r} still has a fixed dim 0 of {batch}: "
                f"the graph hard-codes its batch size; {advice}"
            )
