"""A mutable view of the main graph: producers, consumers, constants, initializers, ranks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from copy import deepcopy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from foldserve.onnx_fold.protos import (
    Array,
    _constant_node_value,
    _default,
    _default_opset,
    _is_batch_norm,
    _reads,
    _subgraphs,
    _to_array,
)


class _Graph:
    """The main graph as Python lists and dicts, rewritten freely and written back once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = [deepcopy(node) for node in graph.node]
        self.initializers = {tensor.name: deepcopy(tensor) for tensor in graph.initializer}
        self.outputs = frozenset(value.name for value in graph.output)
        self.data_inputs = frozenset(value.name for value in _real_inputs(graph))
        # From IR 4 on, an initializer listed as a graph input is a default the caller may
        # override; before, every initializer had to be listed and all were constants (as in ORT).
        self.ir_version = model.ir_version
        weights = {value.name for value in graph.input} - self.data_inputs
        self.overridable = frozenset(weights if self.ir_version >= 4 else ())
        self.ranks, self.elem_types = _inferred_types(model)
        self.batch_axes = _batch_axes(model)
        self.opset = _default_opset(model)
        self._taken = set(_names(graph))
        self._detached: set[str] = set()  # tensors no longer read by us; dropped if dead at the end

    def bypass_identities(self) -> None:
        """Remove Identity nodes on the data path: their readers read the Identity's input.

        NOTE: some exporters (paddle2onnx) put an Identity between a layer and its BN, which hid
        the layer from the fold: the BN became a frozen affine instead of folded. An Identity of a
        constant stays (the legacy torch exporter shares weights through them; read directly,
        a shared weight would no longer be any one layer's own), and so does one that names a
        graph output or is read inside a subgraph.
        """
        for node in [n for n in self.nodes if n.op_type == "Identity" and _default(n)]:
            (source,), (target,) = node.input, node.output
            if target in self.outputs or self.constant(source) is not None:
                continue
            readers = self.consumers(target)
            if any(
                list(reader.input).count(target) != _reads(reader).count(target)
                for reader in readers
            ):
                continue  # read inside a subgraph
            for reader in readers:
                for i, name in enumerate(reader.input):
                    if name == target:
                        reader.input[i] = source
            self.nodes.pop(self._index(node))

    def batch_norms(self) -> list[onnx.NodeProto]:
        return [node for node in self.nodes if _is_batch_norm(node)]

    def uses(self, name: str) -> int:
        """How many node inputs read ``name`` (subgraph references included), +1 if an output."""
        return int(name in self.outputs) + sum(_reads(node).count(name) for node in self.nodes)

    def feeds_only(self, name: str, node: onnx.NodeProto) -> bool:
        return self.uses(name) == 1 and name in node.input

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [node for node in self.nodes if name in _reads(node)]

    def producer(self, name: str) -> onnx.NodeProto | None:
        return next((node for node in self.nodes if name in node.output), None)

    def constant(self, name: str) -> Array | None:
        """The value of ``name`` if it cannot change at run time, else None."""
        if name in self.initializers and name not in self.overridable:
            return _to_array(self.initializers[name])
        producer = self.producer(name)
        if producer is None or not _default(producer):
            return None
        if producer.op_type == "Identity":
            return self.constant(producer.input[0])
        return _constant_node_value(producer) if producer.op_type == "Constant" else None

    def constant_expression(self, name: str) -> Array | None:
        """Like ``constant``, and also the value of a small expression of shape ops over
        constants: exporters write a mean's axes as Reshape(Constant, Constant)."""
        value = self.constant(name)
        producer = self.producer(name) if value is None else None
        if producer is None or producer.op_type not in _FOLDABLE or len(producer.output) != 1:
            return value
        if not _default(producer):
            return None
        inputs = [self.constant_expression(i) if i else None for i in producer.input]
        if any(value is None for i, value in zip(producer.input, inputs, strict=True) if i):
            return None
        return _evaluate(producer, inputs, self.opset)

    def own_constant(self, node: onnx.NodeProto, index: int) -> Array | None:
        """Input ``index`` of ``node`` if it is a constant that no other node reads."""
        name = node.input[index] if index < len(node.input) else ""
        if not name or self.uses(name) != 1:
            return None
        return self.constant(name)

    def own_optional(self, node: onnx.NodeProto, index: int, absent: Array) -> Array | None:
        """Like ``own_constant``, but an absent optional input reads as ``absent``."""
        if index >= len(node.input) or not node.input[index]:
            return absent
        return self.own_constant(node, index)

    def set_input(self, node: onnx.NodeProto, index: int, value: Array, absent: str) -> None:
        """Point input ``index`` of ``node`` at a new initializer named after the old input (or
        ``absent`` when the optional input was not given, in which case it is appended)."""
        old = node.input[index] if index < len(node.input) else ""
        name = self.add_initializer(f"{old or absent}_folded", value)
        if index < len(node.input):
            self._detached.add(old)
            node.input[index] = name
        else:
            node.input.extend([""] * (index - len(node.input)) + [name])

    def add_initializer(self, base: str, value: Array) -> str:
        name = self.fresh(base)
        self.initializers[name] = numpy_helper.from_array(value, name)
        return name

    def fresh(self, base: str) -> str:
        name, suffix = base, 0
        while name in self._taken:
            suffix += 1
            name = f"{base}_{suffix}"
        self._taken.add(name)
        return name

    def replace(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        at = self._index(node)
        self.nodes[at : at + 1] = new_nodes

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        self.nodes.insert(self._index(anchor) + 1, node)

    def remove_batch_norm(self, node: onnx.NodeProto, by: list[onnx.NodeProto]) -> None:
        self.replace(node, by)
        self._detached.update(name for name in node.input[1:] if name)

    def write_back(self, model: onnx.ModelProto) -> None:
        self._drop_dead()
        graph = model.graph
        del graph.node[:]
        graph.node.extend(self.nodes)
        del graph.initializer[:]
        graph.initializer.extend(self.initializers.values())
        if self.ir_version < 4:
            _list_initializers_as_inputs(graph, self.data_inputs)
        # Hints for tensors that no longer exist (a renamed layer output) would confuse readers.
        produced = {name for node in self.nodes for name in node.output}
        kept = [deepcopy(value) for value in graph.value_info if value.name in produced]
        del graph.value_info[:]
        graph.value_info.extend(kept)

    def _drop_dead(self) -> None:
        """Remove detached initializers, Constant and Identity nodes that nothing reads any more."""
        # NOTE: counted once and updated, not with uses(): this loop visits every detached name.
        reads = Counter(name for node in self.nodes for name in _reads(node))
        reads.update(self.outputs)
        pending = list(self._detached)
        while pending:
            name = pending.pop()
            if reads[name] or name in self.overridable or name in self.data_inputs:
                continue
            self.initializers.pop(name, None)
            producer = self.producer(name)
            if producer is not None and producer.op_type in ("Constant", "Identity"):
                self.nodes.pop(self._index(producer))
                reads.subtract(producer.input)
                pending.extend(producer.input)

    def _index(self, node: onnx.NodeProto) -> int:
        # NOTE: by identity; == on protobuf messages compares contents.
        return next(i for i, candidate in enumerate(self.nodes) if candidate is node)


def _list_initializers_as_inputs(graph: onnx.GraphProto, data_inputs: frozenset[str]) -> None:
    """Before IR 4 every initializer must also be a graph input: list new ones, drop dead ones."""
    weights = {tensor.name for tensor in graph.initializer}
    kept = [deepcopy(v) for v in graph.input if v.name in weights or v.name in data_inputs]
    listed = {value.name for value in kept}
    added = [
        helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        for tensor in graph.initializer
        if tensor.name not in listed
    ]
    del graph.input[:]
    graph.input.extend(kept + added)


def _names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every node and tensor name in ``graph`` and its subgraphs, so new names never collide."""
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        yield from (value.name for value in values)
    for node in graph.node:
        yield from (node.name, *node.input, *node.output)
        for subgraph in _subgraphs(node):
            yield from _names(subgraph)


# Shape and type ops over small constants: cheap and exact to evaluate at fold time.
_FOLDABLE = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Cast", "Concat"})
_FOLDABLE_ELEMENTS = 1 << 16


def _evaluate(node: onnx.NodeProto, inputs: list[Array | None], opset: int) -> Array | None:
    """``node``'s output for constant ``inputs`` (None for an absent optional one)."""
    from onnx.reference import ReferenceEvaluator

    if sum(value.size for value in inputs if value is not None) > _FOLDABLE_ELEMENTS:
        return None
    pairs = zip(node.input, inputs, strict=True)
    feeds = {name: value for name, value in pairs if name and value is not None}
    graph = helper.make_graph(
        [node],
        "constant",
        [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
            )
            for name, value in feeds.items()
        ],
        [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UNDEFINED, None)],
    )
    try:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        (result,) = ReferenceEvaluator(model).run(None, feeds)
    except Exception:  # anything the reference cannot run stays unknown: refused as before
        return None
    return np.asarray(result)


def _inferred_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Rank and element type of every main-graph tensor that ONNX shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # onnx raises several types on models it cannot infer; declared types remain
        inferred = model
    ranks: dict[str, int] = {}
    elem_types: dict[str, int] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type:
            elem_types[value.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            ranks[value.name] = len(tensor_type.shape.dim)
    return ranks, elem_types


_BATCH = "__foldserve_batch__"


def _batch_axes(model: onnx.ModelProto) -> dict[str, int]:
    """For each main-graph tensor whose shape ONNX inference can follow with a symbolic batch,
    the one axis that holds the batch (absent when inference loses it or finds it twice).

    NOTE: axis 0 is the batch for the graph's inputs only: an exporter that stacks tensors
    (torch.stack(levels, dim=0)) moves the batch to axis 1, and a mean over axis 0 then mixes
    levels of one sample, not samples.
    """
    probe = deepcopy(model)
    for value in _real_inputs(probe.graph):
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if dims:
            dims[0].Clear()
            dims[0].dim_param = _BATCH
    del probe.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:  # nothing learned: every reduction keeps the axis-0 rule
        return {}
    axes: dict[str, int] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            found = [i for i, dim in enumerate(dims) if dim.dim_param == _BATCH]
            if len(found) == 1:
                axes[value.name] = found[0]
    return axes


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Before IR 4 initializers were also listed as inputs; those are weights, not data.
    weights = {tensor.name for tensor in graph.initializer}
    return [value for value in graph.input if value.name not in weights]
