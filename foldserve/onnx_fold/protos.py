"""Small readers and writers of ONNX protobuf messages: node kinds, attributes, tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from service.errors import FoldingError

Array = NDArray[Any]
Float64 = NDArray[np.float64]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _default(node: onnx.NodeProto) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def _is_batch_norm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and _default(node)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _reads(node: onnx.NodeProto) -> list[str]:
    """Names ``node`` reads, including outer-scope names its subgraphs (If, Loop, Scan) read."""
    names = list(node.input)
    for subgraph in _subgraphs(node):
        names += [value.name for value in subgraph.output]
        for inner in subgraph.node:
            names += _reads(inner)
    return names


def _to_array(tensor: onnx.TensorProto) -> Array:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise FoldingError(
            f"initializer {tensor.name!r} is stored outside the model: load it with "
            "onnx.load(path, load_external_data=True) before folding"
        )
    return numpy_helper.to_array(tensor)


def _constant_node_value(node: onnx.NodeProto) -> Array | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return _to_array(attribute.t)
        if attribute.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(attribute), dtype=np.float32)
        if attribute.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attribute), dtype=np.int64)
    return None  # sparse or string constants are never statistics or weights


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)
