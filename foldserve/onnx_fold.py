"""Fold every inference-mode BatchNormalization of an ONNX model from any exporter: onnx and numpy.

Each BatchNormalization (BN), in graph order, goes to the first place that keeps the outputs exact,
as ``foldserve.fold`` does for torch modules:

1. ``folded_into_previous``: its input comes only from a Conv, a ConvTranspose, a Gemm, or a MatMul
   with a constant (K, N) weight on a 2-D activation (optionally through an Add of a constant
   bias); that layer's output channels are scaled and shifted.
2. ``folded_into_next``: its output feeds only a Conv that never pads, a Gemm, or a MatMul with a
   constant (K, N) weight on a 2-D activation; that layer's input channels are scaled and the
   shift becomes (part of) its bias.
3. ``frozen_affine``: otherwise it becomes ``Add(Mul(x, scale), shift)`` with constants shaped
   (C, 1, ..., 1) for the input's rank.

A layer is rewritten only when nothing else sees the change: its weight and bias must be constants
read by that node alone, and (folding into the previous layer) its output must feed only the BN.
A constant is an initializer that is not also a graph input (from IR 4 on, those can be
overridden at run time), a ``Constant`` node, or an ``Identity`` of one (the legacy torch exporter
deduplicates equal initializers through Identity nodes). Rewritten tensors get new initializers;
the old ones are removed once nothing reads them. Graph input and output names, the opset and the
dynamic batch dimension are kept. Each record names the BN and the layer it went into by node
name, or by their output's original name when a node is unnamed.

Refused with ``FoldingError`` before anything is rewritten (see ``_refuse_batch_statistics``): a BN
in training mode or declaring its training outputs, a BN inside a subgraph or local function, and
ops that mix samples by reducing over axis 0. Refused while folding: a BN whose statistics are not
constants, are not finite, or have ``var + eps <= 0``.

``dynamic_batch_problem`` and ``make_batch_dynamic`` detect and fix a graph exported with a fixed
batch size, which a batching server cannot feed.

NOTE: arithmetic runs in float64 and each new tensor is cast to its dtype once, at the end.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from service.errors import FoldingError
from service.store import BatchNormRecord, Placement

Array = NDArray[Any]
Float64 = NDArray[np.float64]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONV_OPS = ("Conv", "ConvTranspose")
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


@dataclass(frozen=True)
class OnnxFoldResult:
    model: onnx.ModelProto  # checked with onnx.checker, no BatchNormalization left
    records: tuple[BatchNormRecord, ...]  # one per BatchNormalization, in graph order


def fold_onnx_batch_norms(model: onnx.ModelProto) -> OnnxFoldResult:
    """Fold or freeze every BatchNormalization of a copy of ``model``; ``model`` is untouched."""
    _check(model, "the input model is not valid ONNX")
    work = deepcopy(model)
    graph = _Graph(work)
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


# ---------------------------------------------------------------- a mutable view of the graph


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
        self._taken = set(_names(graph))
        self._detached: set[str] = set()  # tensors no longer read by us; dropped if dead at the end

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


def _names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every node and tensor name in ``graph`` and its subgraphs, so new names never collide."""
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        yield from (value.name for value in values)
    for node in graph.node:
        yield from (node.name, *node.input, *node.output)
        for subgraph in _subgraphs(node):
            yield from _names(subgraph)


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


# ---------------------------------------------------------------- refusals


def _refuse_batch_statistics(model: onnx.ModelProto, graph: _Graph) -> None:
    """Refuse every op whose output for one sample depends on the other samples of its batch.

    Covered: BatchNormalization in training mode; BatchNormalization in a subgraph or function
    (not folded here); Reduce* ops, ArgMax/ArgMin and MeanVarianceNormalization whose axes include
    0, or that reduce every axis, on an input of rank >= 2 or unknown rank. Rank-1 inputs are
    allowed: they are shape vectors far more often than per-sample scalars. A negative axis counts
    as 0 only where the rank is known. Per-sample normalizations (Instance-, Group-,
    LayerNormalization) are fine. Not covered: other ops that can mix samples (e.g. Softmax with
    axis=0, Transpose moving the batch axis); the server's batch-invariance checks catch those.
    """
    opset = _default_opset(model)
    for node in graph.nodes:
        _refuse_sample_mixing(graph, node, graph.ranks.get(node.input[0]) if node.input else None)
        if _is_batch_norm(node):
            _refuse_training_mode(node, opset)
        for subgraph in _subgraphs(node):
            _refuse_nested(graph, subgraph.node, f"a subgraph of {node.op_type} {node.name!r}")
    for function in model.functions:
        _refuse_nested(graph, function.node, f"local function {function.name!r}")


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
    if axes == "all" or any(axis == 0 or (rank is not None and axis == -rank) for axis in axes):
        raise FoldingError(
            f"{node.op_type} {node.name or node.output[0]!r} reduces over axis 0, the batch "
            "axis: each sample's output would depend on its batch mates"
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
        value = graph.constant(node.input[1])
        if value is None:
            raise FoldingError(
                f"{node.op_type} {node.name or node.output[0]!r} takes its axes at run time: "
                "cannot prove it never reduces over the batch axis"
            )
        axes = value.reshape(-1).tolist()
    if not axes:
        return None if _attribute(node, "noop_with_empty_axes", 0) else "all"
    return [int(axis) for axis in axes]


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class _BatchNorm:
    """One BN: ``y = x * scale + shift`` per channel (float64), and what placing it needs."""

    node: onnx.NodeProto
    name: str
    scale: Float64
    shift: Float64
    rank: int | None  # of the input, from shape inference
    dtype: np.dtype[Any]  # of the input

    @property
    def features(self) -> int:
        return len(self.scale)

    @property
    def input(self) -> str:
        return str(self.node.input[0])

    @property
    def output(self) -> str:
        return str(self.node.output[0])


def _fold_one(graph: _Graph, node: onnx.NodeProto) -> BatchNormRecord:
    name = node.name or node.output[0]
    (mean, var, eps, scale, bias), dtype = _statistics(graph, node, name)
    multiplier = scale / np.sqrt(var + eps)
    rank = graph.ranks.get(node.input[0], graph.ranks.get(node.output[0]))
    batch_norm = _BatchNorm(node, name, multiplier, bias - mean * multiplier, rank, dtype)
    placement, target = _place(graph, batch_norm)
    digest = hashlib.sha256()
    for values in (mean, var, eps, scale, bias):
        digest.update(values.astype("<f8").tobytes())
    return BatchNormRecord(
        name=name,
        features=batch_norm.features,
        placement=placement,
        target=target,
        stats_sha256=digest.hexdigest(),
    )


def _statistics(
    graph: _Graph, node: onnx.NodeProto, name: str
) -> tuple[tuple[Float64, Float64, Float64, Float64, Float64], np.dtype[Any]]:
    """(mean, var, eps, scale, bias) in float64 and the input dtype; refuses what cannot fold."""
    arrays: dict[str, Array] = {}
    for label, tensor in zip(("scale", "bias", "mean", "var"), node.input[1:5], strict=False):
        value = graph.constant(tensor) if tensor else None
        if value is None:
            raise FoldingError(
                f"BatchNormalization {name!r}: its {label} ({tensor!r}) is not a constant "
                "(an initializer or Constant node), so its statistics cannot be frozen"
            )
        arrays[label] = value
    shapes = {value.shape for value in arrays.values()}
    if len(arrays) != 4 or len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise FoldingError(
            f"BatchNormalization {name!r}: scale, bias, mean and var must be four 1-D constants "
            f"of one length, got shapes {[value.shape for value in arrays.values()]}"
        )
    # NOTE: the attribute is a float32; its shortest decimal (1e-05, not 9.99999974e-06) is what
    # the exporter was given, and hashing that keeps stats_sha256 equal to foldserve.fold's.
    eps = np.array([float(str(np.float32(_attribute(node, "epsilon", 1e-5))))])
    as_f64 = {label: value.astype(np.float64) for label, value in arrays.items()}
    for label, value in (*as_f64.items(), ("epsilon", eps)):
        if not np.isfinite(value).all():
            raise FoldingError(f"BatchNormalization {name!r} has non-finite values in {label}")
    if not (as_f64["var"] + eps > 0).all():
        raise FoldingError(f"BatchNormalization {name!r} has var + epsilon <= 0")
    elem_type = graph.elem_types.get(node.input[0])
    dtype = helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else arrays["scale"].dtype
    stats = (as_f64["mean"], as_f64["var"], eps, as_f64["scale"], as_f64["bias"])
    return stats, dtype


# ---------------------------------------------------------------- placement


def _place(graph: _Graph, bn: _BatchNorm) -> tuple[Placement, str | None]:
    target = _fold_into_previous(graph, bn)
    if target is not None:
        return "folded_into_previous", target
    target = _fold_into_next(graph, bn)
    if target is not None:
        return "folded_into_next", target
    _freeze(graph, bn)
    return "frozen_affine", None


# A rule checks everything before it rewrites anything; it returns the name of the layer it
# rewrote (previous) or whether it did (next).
_PreviousRule = Callable[[_Graph, onnx.NodeProto, _BatchNorm], str | None]
_NextRule = Callable[[_Graph, _BatchNorm, onnx.NodeProto], bool]


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


def _is_row_vector(shape: tuple[int, ...], columns: int) -> bool:
    """Whether a bias of ``shape`` broadcasts over (rows, columns) the same for every row."""
    return (
        len(shape) <= 2 and all(d == 1 for d in shape[:-1]) and shape[-1:] in ((), (1,), (columns,))
    )


# ---------------------------------------------------------------- folding into the previous layer


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


def _set_weight_and_bias(graph: _Graph, layer: onnx.NodeProto, weight: Array, bias: Array) -> None:
    """Inputs 1 and 2 of a Conv or Gemm; the bias takes the weight's dtype, as the op requires."""
    graph.set_input(layer, 2, bias.astype(weight.dtype), absent=f"{layer.input[1]}_bias")
    graph.set_input(layer, 1, weight, absent="")


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


_PREVIOUS_RULES: dict[str, _PreviousRule] = {
    "Conv": _conv_then_bn,
    "ConvTranspose": _conv_transpose_then_bn,
    "Gemm": _gemm_then_bn,
    "MatMul": _matmul_then_bn,
    "Add": _matmul_add_then_bn,
}


# ---------------------------------------------------------------- folding into the next layer


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


# ---------------------------------------------------------------- the batch dimension


def dynamic_batch_problem(model: onnx.ModelProto) -> str | None:
    """None when every graph input's dim 0 is symbolic or unknown, else what to do about it."""
    for value in _real_inputs(model.graph):
        batch = _fixed_batch(value)
        if batch is not None:
            return _fixed_batch_message(value.name, batch)
    return None


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
    advice = _fixed_batch_message(inputs[0].name, min(batches))
    _refuse_baked_reshape(result, batches, advice)
    _refuse_fixed_output_batch(result, advice)
    return result


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Before IR 4 initializers were also listed as inputs; those are weights, not data.
    weights = {tensor.name for tensor in graph.initializer}
    return [value for value in graph.input if value.name not in weights]


def _fixed_batch(value: onnx.ValueInfoProto) -> int | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.shape.dim:
        return None
    dim = value.type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def _fixed_batch_message(name: str, batch: int) -> str:
    axes = f"{{{name!r}: {{0: 'batch'}}}}"
    return (
        f"input {name!r} has a fixed batch dimension of {batch}: re-export with a dynamic batch, "
        f"e.g. torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes={axes}"
    )


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
