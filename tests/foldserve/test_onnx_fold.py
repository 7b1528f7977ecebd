"""Folding BatchNormalization in ONNX graphs: every fold keeps onnxruntime's outputs.

Graphs are built by hand with onnx.helper (one per rule), plus one exported by torch's legacy
exporter. Tolerance: ``max|folded - original| <= 1e-5 * max|original|`` on batches of 1 and 5.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from foldserve.onnx_fold import (
    OnnxFoldResult,
    dynamic_batch_problem,
    fold_onnx_batch_norms,
    make_batch_dynamic,
)
from service.errors import FoldingError
from service.store import Placement

OPSET = 17
RELATIVE_TOLERANCE = 1e-5
Array = NDArray[np.float32]
Expected = tuple[str, Placement, str | None]  # (record name, placement, target)


# ---------------------------------------------------------------- building graphs


def value(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def output(name: str, rank: int) -> onnx.ValueInfoProto:
    """An output of known rank and unknown (symbolic) dims."""
    return value(name, [f"{name}_{axis}" for axis in range(rank)])


def tensor(name: str, array: NDArray[Any]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def make(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    opset: int = OPSET,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what onnxruntime and every exporter of opset 17 agree on
    onnx.checker.check_model(model)
    return model


def batch_norm(
    name: str, x: str, y: str, channels: int, seed: int, **attributes: Any
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A BatchNormalization with non-trivial statistics, and its four initializers."""
    rng = np.random.default_rng(seed)
    stats = {
        f"{name}.scale": 1 + 0.5 * rng.standard_normal(channels),
        f"{name}.bias": rng.standard_normal(channels),
        f"{name}.mean": rng.standard_normal(channels),
        f"{name}.var": rng.uniform(0.5, 2.0, channels),
    }
    node = helper.make_node("BatchNormalization", [x, *stats], [y], name=name, **attributes)
    return node, [tensor(key, array) for key, array in stats.items()]


def weights(name: str, shape: Sequence[int], seed: int) -> onnx.TensorProto:
    return tensor(name, np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[-1]))


def run(model: onnx.ModelProto, x: Array) -> list[Array]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [np.asarray(out) for out in session.run(None, {session.get_inputs()[0].name: x})]


def assert_same_outputs(
    original: onnx.ModelProto, folded: onnx.ModelProto, sample: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, *sample)).astype(np.float32)
        for expected, actual in zip(run(original, x), run(folded, x), strict=True):
            assert actual.shape == expected.shape
            scale = float(np.abs(expected).max())
            assert np.abs(actual - expected).max() <= RELATIVE_TOLERANCE * scale


def data_inputs(model: onnx.ModelProto) -> list[str]:
    weights = {t.name for t in model.graph.initializer}  # listed as inputs before IR 4
    return [v.name for v in model.graph.input if v.name not in weights]


def fold_and_check(
    model: onnx.ModelProto, sample: tuple[int, ...], expected: list[Expected]
) -> OnnxFoldResult:
    before = model.SerializeToString()
    result = fold_onnx_batch_norms(model)
    assert model.SerializeToString() == before, "the caller's model must be untouched"
    folded = result.model
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0
    assert [(r.name, r.placement, r.target) for r in result.records] == expected
    assert data_inputs(folded) == data_inputs(model)
    assert [v.name for v in folded.graph.output] == [v.name for v in model.graph.output]
    assert folded.opset_import == model.opset_import
    used = {name for node in folded.graph.node for name in node.input}
    assert all(t.name in used for t in folded.graph.initializer), "dead initializers left"
    assert_same_outputs(model, folded, sample)
    return result


# ---------------------------------------------------------------- folding into the previous layer


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    transpose=st.booleans(),
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    spatial_dims=st.integers(1, 2),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_or_conv_transpose_then_bn_folds_into_the_conv(
    transpose: bool,
    groups: int,
    in_per_group: int,
    out_per_group: int,
    kernel: int,
    spatial_dims: int,
    with_bias: bool,
    seed: int,
) -> None:
    c_in, c_out = groups * in_per_group, groups * out_per_group
    kernel_shape = [kernel] * spatial_dims
    # Conv weights are (out, in/groups, *k), ConvTranspose weights (in, out/groups, *k).
    w_shape = [c_in, out_per_group] if transpose else [c_out, in_per_group]
    initializers = [weights("w", w_shape + kernel_shape, seed)]
    if with_bias:
        initializers.append(tensor("b", np.random.default_rng(seed).standard_normal(c_out)))
    op = "ConvTranspose" if transpose else "Conv"
    conv = helper.make_node(
        op, ["x", "w", *(["b"] if with_bias else [])], ["h"], name="conv", group=groups
    )
    bn, stats = batch_norm("bn", "h", "y", c_out, seed)
    sample = (c_in, *[5] * spatial_dims)
    model = make(
        [conv, bn],
        initializers + stats,
        [value("x", ["N", *sample])],
        [output("y", 1 + len(sample))],
    )
    fold_and_check(model, sample, [("bn", "folded_into_previous", "conv")])


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, "vector", "scalar", "row"])
def test_gemm_then_bn_folds_into_the_gemm(trans_b: int, bias: str | None) -> None:
    k, n = 6, 4
    initializers = [weights("w", (n, k) if trans_b else (k, n), 1)]
    shapes = {"vector": (n,), "scalar": (), "row": (1, n)}
    if bias is not None:
        initializers.append(tensor("c", np.random.default_rng(2).standard_normal(shapes[bias])))
    gemm = helper.make_node(
        "Gemm",
        ["x", "w", *(["c"] if bias else [])],
        ["h"],
        name="gemm",
        transB=trans_b,
        alpha=0.7,
        beta=1.3,
    )
    bn, stats = batch_norm("bn", "h", "y", n, 3)
    model = make([gemm, bn], initializers + stats, [value("x", ["N", k])], [value("y", ["N", n])])
    fold_and_check(model, (k,), [("bn", "folded_into_previous", "gemm")])


@pytest.mark.parametrize("bias_side", [None, 0, 1])
def test_matmul_then_bn_folds_into_the_matmul(bias_side: int | None) -> None:
    k, n = 6, 4
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"], name="matmul")]
    initializers = [weights("w", (k, n), 1)]
    source = "p"
    if bias_side is not None:
        initializers.append(tensor("b", np.random.default_rng(2).standard_normal(n)))
        inputs = ["p", "b"] if bias_side == 1 else ["b", "p"]
        nodes.append(helper.make_node("Add", inputs, ["h"], name="add"))
        source = "h"
    bn, stats = batch_norm("bn", source, "y", n, 3)
    model = make([*nodes, bn], initializers + stats, [value("x", ["N", k])], [value("y", ["N", n])])
    result = fold_and_check(model, (k,), [("bn", "folded_into_previous", "matmul")])
    assert [node.op_type for node in result.model.graph.node] == ["MatMul", "Add"]


def test_matmul_on_a_3d_activation_is_not_folded_into() -> None:
    # On (B, T, K) @ (K, N) the BN's channel axis 1 is T, not the weight's N.
    w = weights("w", (4, 4), 1)
    matmul = helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul")
    bn, stats = batch_norm("bn", "h", "y", 4, 3)
    model = make([matmul, bn], [w, *stats], [value("x", ["N", 4, 4])], [output("y", 3)])
    fold_and_check(model, (4, 4), [("bn", "frozen_affine", None)])


def test_bn_output_as_graph_output_keeps_its_name() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1])
    bn, stats = batch_norm("bn", "h", "y", 4, 1)
    model = make(
        [conv, bn],
        [weights("w", (4, 3, 3, 3), 0), *stats],
        [value("x", ["N", 3, 6, 6])],
        [output("y", 4)],
    )
    result = fold_and_check(model, (3, 6, 6), [("bn", "folded_into_previous", "conv")])
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert result.model.graph.node[0].output[0] == "y"


# ---------------------------------------------------------------- folding into the next layer


def relu_bn(channels: int, seed: int = 1) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Relu -> BN named "bn" writing "z": nothing before the BN to fold into."""
    bn, stats = batch_norm("bn", "r", "z", channels, seed)
    return [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn], stats


@pytest.mark.parametrize(
    ("attributes", "placement"),
    [
        ({"pads": [0, 0, 0, 0]}, "folded_into_next"),
        ({"auto_pad": "VALID"}, "folded_into_next"),
        ({"pads": [1, 1, 1, 1]}, "frozen_affine"),  # zero padding: folding would not be exact
        ({"auto_pad": "SAME_UPPER"}, "frozen_affine"),
    ],
)
def test_bn_then_conv_folds_only_without_zero_padding(
    attributes: dict[str, Any], placement: Placement
) -> None:
    nodes, stats = relu_bn(4)
    conv = helper.make_node("Conv", ["z", "w", "b"], ["y"], name="conv", group=2, **attributes)
    initializers = [weights("w", (6, 2, 3, 3), 2), tensor("b", np.arange(6.0)), *stats]
    model = make([*nodes, conv], initializers, [value("x", ["N", 4, 7, 7])], [output("y", 4)])
    target = "conv" if placement == "folded_into_next" else None
    fold_and_check(model, (4, 7, 7), [("bn", placement, target)])


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bn_then_gemm_folds_into_the_gemm(trans_b: int, with_bias: bool) -> None:
    k, n = 4, 3
    nodes, stats = relu_bn(k)
    initializers = [weights("w", (n, k) if trans_b else (k, n), 2), *stats]
    if with_bias:
        initializers.append(tensor("c", np.arange(float(n))))
    gemm = helper.make_node(
        "Gemm",
        ["z", "w", *(["c"] if with_bias else [])],
        ["y"],
        name="gemm",
        transB=trans_b,
        alpha=0.5,
        beta=2.0,
    )
    model = make([*nodes, gemm], initializers, [value("x", ["N", k])], [output("y", 2)])
    fold_and_check(model, (k,), [("bn", "folded_into_next", "gemm")])


def test_bn_then_matmul_folds_into_the_matmul() -> None:
    nodes, stats = relu_bn(4)
    matmul = helper.make_node("MatMul", ["z", "w"], ["y"], name="matmul")
    model = make(
        [*nodes, matmul],
        [weights("w", (4, 3), 2), *stats],
        [value("x", ["N", 4])],
        [output("y", 2)],
    )
    result = fold_and_check(model, (4,), [("bn", "folded_into_next", "matmul")])
    assert [node.op_type for node in result.model.graph.node] == ["Relu", "MatMul", "Add"]


# ---------------------------------------------------------------- frozen affine


def test_bn_feeding_two_consumers_becomes_a_frozen_affine() -> None:
    nodes, stats = relu_bn(4)
    conv = helper.make_node("Conv", ["z", "w"], ["y1"], name="conv")
    sigmoid = helper.make_node("Sigmoid", ["z"], ["y2"], name="sigmoid")
    model = make(
        [*nodes, conv, sigmoid],
        [weights("w", (2, 4, 1, 1), 2), *stats],
        [value("x", ["N", 4, 3, 3])],
        [output("y1", 4), output("y2", 4)],
    )
    result = fold_and_check(model, (4, 3, 3), [("bn", "frozen_affine", None)])
    ops = [node.op_type for node in result.model.graph.node]
    assert ops == ["Relu", "Mul", "Add", "Conv", "Sigmoid"]
    shapes = [tuple(t.dims) for t in result.model.graph.initializer if t.name.startswith("bn_")]
    assert shapes == [(4, 1, 1), (4, 1, 1)]


def test_bn_at_the_output_becomes_a_frozen_affine() -> None:
    nodes, stats = relu_bn(5)
    model = make(nodes, stats, [value("x", ["N", 5, 2, 2, 2])], [output("z", 5)])
    fold_and_check(model, (5, 2, 2, 2), [("bn", "frozen_affine", None)])


def test_conv_whose_output_feeds_two_consumers_is_not_folded_into() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["h"], name="conv")
    bn, stats = batch_norm("bn", "h", "y", 4, 1)
    tap = helper.make_node("Relu", ["h"], ["residual"], name="tap")
    model = make(
        [conv, bn, tap],
        [weights("w", (4, 3, 1, 1), 0), *stats],
        [value("x", ["N", 3, 4, 4])],
        [output("y", 4), output("residual", 4)],
    )
    fold_and_check(model, (3, 4, 4), [("bn", "frozen_affine", None)])


def test_shared_conv_weight_is_not_folded_into() -> None:
    nodes, initializers = [], [weights("w", (3, 3, 1, 1), 0)]
    for i in (1, 2):
        source = "x" if i == 1 else "y1"
        nodes.append(helper.make_node("Conv", [source, "w"], [f"h{i}"], name=f"conv{i}"))
        bn, stats = batch_norm(f"bn{i}", f"h{i}", f"y{i}", 3, i)
        nodes.append(bn)
        initializers += stats
    model = make(nodes, initializers, [value("x", ["N", 3, 4, 4])], [output("y2", 4)])
    # bn1 cannot go into conv1 (shared weight) nor conv2 (same weight); bn2 likewise.
    fold_and_check(
        model, (3, 4, 4), [("bn1", "frozen_affine", None), ("bn2", "frozen_affine", None)]
    )


def test_after_instance_normalization_is_fine() -> None:
    norm = helper.make_node("InstanceNormalization", ["x", "s", "t"], ["r"], name="inorm")
    bn, stats = batch_norm("bn", "r", "z", 3, 1)
    initializers = [tensor("s", np.ones(3)), tensor("t", np.zeros(3)), *stats]
    model = make([norm, bn], initializers, [value("x", ["N", 3, 5])], [output("z", 3)])
    fold_and_check(model, (3, 5), [("bn", "frozen_affine", None)])


# ---------------------------------------------------------------- where statistics come from


def test_statistics_from_constant_and_identity_nodes_fold_and_are_cleaned_up() -> None:
    # The legacy torch exporter deduplicates equal initializers through Identity nodes.
    rng = np.random.default_rng(0)
    shared = tensor("shared", rng.uniform(0.5, 2.0, 4))  # used as scale and as var
    nodes = [
        helper.make_node("Identity", ["shared"], ["bn.scale"], name="id_scale"),
        helper.make_node("Identity", ["shared"], ["bn.var"], name="id_var"),
        helper.make_node(
            "Constant", [], ["bn.mean"], name="mean", value=tensor("m", rng.standard_normal(4))
        ),
        helper.make_node(
            "Constant", [], ["bn.bias"], name="bias", value_floats=[0.1, 0.2, 0.3, 0.4]
        ),
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
        helper.make_node(
            "BatchNormalization",
            ["h", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            ["y"],
            name="bn",
        ),
    ]
    model = make(
        nodes,
        [shared, weights("w", (4, 2, 3, 3), 1)],
        [value("x", ["N", 2, 5, 5])],
        [output("y", 4)],
    )
    result = fold_and_check(model, (2, 5, 5), [("bn", "folded_into_previous", "conv")])
    assert [node.op_type for node in result.model.graph.node] == ["Conv"]
    assert len(result.model.graph.initializer) == 2  # the folded weight and bias only


def test_ir3_model_listing_initializers_as_inputs_folds() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["h"], name="conv")
    bn, stats = batch_norm("bn", "h", "y", 4, 1)
    initializers = [weights("w", (4, 2, 3, 3), 0), *stats]
    listed = [value(t.name, list(t.dims)) for t in initializers]
    graph = helper.make_graph(
        [conv, bn], "g", [value("x", ["N", 2, 5, 5]), *listed], [output("y", 4)], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    result = fold_and_check(model, (2, 5, 5), [("bn", "folded_into_previous", "conv")])
    names = sorted(v.name for v in result.model.graph.input)
    assert names == sorted(["x", *(t.name for t in result.model.graph.initializer)])


def test_unnamed_bn_is_recorded_by_its_output() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["h"])
    bn, stats = batch_norm("bn", "h", "y", 4, 1)
    bn.name = ""
    model = make(
        [conv, bn],
        [weights("w", (4, 2, 1), 0), *stats],
        [value("x", ["N", 2, 3])],
        [output("y", 3)],
    )
    fold_and_check(model, (2, 3), [("y", "folded_into_previous", "h")])


# ---------------------------------------------------------------- refusals


def bn_model(**attributes: Any) -> onnx.ModelProto:
    bn, stats = batch_norm("the_bn", "x", "y", 3, 0, **attributes)
    return make([bn], stats, [value("x", ["N", 3, 4])], [output("y", 3)])


def test_training_mode_is_refused_naming_the_node() -> None:
    bn, stats = batch_norm("the_bn", "x", "y", 3, 0, training_mode=1)
    bn.output.extend(["running_mean", "running_var"])
    model = make([bn], stats, [value("x", ["N", 3, 4])], [output("y", 3)])
    with pytest.raises(FoldingError, match=r"'the_bn' runs in training mode"):
        fold_onnx_batch_norms(model)


def test_training_outputs_are_refused() -> None:
    bn, stats = batch_norm("the_bn", "x", "y", 3, 0)
    bn.output.extend(["mean", "var", "saved_mean", "saved_var"])
    model = make([bn], stats, [value("x", ["N", 3, 4])], [output("y", 3)], opset=9)
    with pytest.raises(FoldingError, match=r"'the_bn' declares training outputs"):
        fold_onnx_batch_norms(model)


@pytest.mark.parametrize(
    "make_reduction",
    [
        lambda: (helper.make_node("ReduceMean", ["x"], ["r"], name="mix", axes=[0]), [], 17),
        lambda: (helper.make_node("ReduceMean", ["x"], ["r"], name="mix", axes=[-3]), [], 17),
        lambda: (helper.make_node("ReduceSumSquare", ["x"], ["r"], name="mix"), [], 17),
        lambda: (
            helper.make_node("ReduceSum", ["x", "axes"], ["r"], name="mix"),
            [numpy_helper.from_array(np.array([0, 2], dtype=np.int64), "axes")],
            13,
        ),
    ],
    ids=["axes=[0]", "axes=[-rank]", "all axes", "axes input [0, 2]"],
)
def test_reduction_over_the_batch_axis_is_refused(make_reduction: Any) -> None:
    reduction, extra, opset = make_reduction()
    bn, stats = batch_norm("bn", "x", "z", 3, 0)
    nodes = [bn, reduction]
    model = make(nodes, [*stats, *extra], [value("x", ["N", 3, 4])], [output("r", 3)], opset)
    with pytest.raises(FoldingError, match=r"'mix' reduces over axis 0"):
        fold_onnx_batch_norms(model)


def test_per_sample_reductions_and_shape_arithmetic_are_fine() -> None:
    bn, stats = batch_norm("bn", "x", "z", 3, 0)
    nodes = [
        bn,
        helper.make_node("ReduceMean", ["z"], ["m"], name="per_sample", axes=[1, -1]),
        helper.make_node("Shape", ["z"], ["shape"], name="shape"),
        helper.make_node("ReduceProd", ["shape"], ["size"], name="size", keepdims=0),
    ]
    model = make(
        nodes,
        stats,
        [value("x", ["N", 3, 4])],
        [output("m", 3), helper.make_tensor_value_info("size", TensorProto.INT64, [])],
    )
    fold_and_check(model, (3, 4), [("bn", "frozen_affine", None)])


def _axes_expression(axes: list[int]) -> list[onnx.NodeProto]:
    """Axes written as torch's unoptimized exporter writes them: Reshape(Constant, Constant)."""
    return [
        helper.make_node(
            "Constant", [], ["flat"], value=numpy_helper.from_array(np.array(axes, np.int64))
        ),
        helper.make_node(
            "Constant", [], ["to"], value=numpy_helper.from_array(np.array([-1], np.int64))
        ),
        helper.make_node("Reshape", ["flat", "to"], ["axes"], name="axes_reshape"),
    ]


def test_axes_from_a_constant_expression_are_evaluated() -> None:
    bn, stats = batch_norm("bn", "x", "z", 3, 0)
    mean = helper.make_node("ReduceMean", ["z", "axes"], ["m"], name="mean")
    model = make(
        [bn, *_axes_expression([2]), mean], stats, [value("x", ["N", 3, 4])], [output("m", 3)], 18
    )
    fold_and_check(model, (3, 4), [("bn", "frozen_affine", None)])
    mixing = make(
        [bn, *_axes_expression([0]), mean], stats, [value("x", ["N", 3, 4])], [output("m", 3)], 18
    )
    with pytest.raises(FoldingError, match=r"'mean' reduces over axis 0, the batch axis"):
        fold_onnx_batch_norms(mixing)


@pytest.mark.parametrize(("axis", "mixes"), [(0, False), (1, True)])
def test_the_batch_axis_is_followed_through_a_stack(axis: int, mixes: bool) -> None:
    """torch.mean(torch.stack(levels, dim=0), dim=0), as MONAI's registration nets end: axis 0
    of the stack is the level, and the batch has moved to axis 1."""
    bn, stats = batch_norm("bn", "x", "z", 3, 0)
    axes = numpy_helper.from_array(np.array([0], np.int64), "zero")
    nodes = [
        bn,
        helper.make_node("Unsqueeze", ["x", "zero"], ["level0"], name="u0"),
        helper.make_node("Unsqueeze", ["z", "zero"], ["level1"], name="u1"),
        helper.make_node("Concat", ["level0", "level1"], ["stack"], name="stack", axis=0),
        helper.make_node("ReduceMean", ["stack"], ["m"], name="mean", axes=[axis], keepdims=0),
    ]
    model = make(nodes, [*stats, axes], [value("x", ["N", 3, 4])], [output("m", 3)])
    if mixes:
        with pytest.raises(FoldingError, match=r"'mean' reduces over axis 1, the batch axis"):
            fold_onnx_batch_norms(model)
    else:
        fold_and_check(model, (3, 4), [("bn", "frozen_affine", None)])


def _constant(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64))
    )


@pytest.mark.parametrize(("axis", "mixes"), [(0, False), (1, True)])
def test_the_batch_axis_is_found_by_running_the_graph_where_inference_loses_it(
    axis: int, mixes: bool
) -> None:
    """A Resize to sizes read from the input's Shape: shape inference loses the batch there
    (as in MONAI's LocalNet), onnxruntime at three batch sizes finds it on axis 1 of the stack."""
    bn, stats = batch_norm("bn", "x", "z", 3, 0)
    nodes = [
        bn,
        helper.make_node("Shape", ["z"], ["shape"], name="shape"),
        _constant("start", [0]),
        _constant("stop", [2]),
        _constant("hw", [8, 8]),
        _constant("zero", [0]),
        helper.make_node("Slice", ["shape", "start", "stop"], ["nc"], name="nc"),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], name="sizes", axis=0),
        helper.make_node("Resize", ["z", "", "", "sizes"], ["up"], name="up", mode="nearest"),
        helper.make_node("Unsqueeze", ["up", "zero"], ["level0"], name="u0"),
        helper.make_node("Unsqueeze", ["up", "zero"], ["level1"], name="u1"),
        helper.make_node("Concat", ["level0", "level1"], ["stack"], name="stack", axis=0),
        helper.make_node("ReduceMean", ["stack"], ["m"], name="mean", axes=[axis], keepdims=0),
    ]
    model = make(nodes, stats, [value("x", ["N", 3, 4, 4])], [output("m", 4)])
    if mixes:
        with pytest.raises(FoldingError, match=r"'mean' reduces over axis 1, the batch axis"):
            fold_onnx_batch_norms(model)
    else:
        fold_and_check(model, (3, 4, 4), [("bn", "frozen_affine", None)])


def test_statistics_that_are_not_constants_are_refused() -> None:
    bn, stats = batch_norm("the_bn", "x", "y", 3, 0)
    model = make(
        [bn], stats[1:], [value("x", ["N", 3, 4]), value("the_bn.scale", [3])], [output("y", 3)]
    )
    with pytest.raises(FoldingError, match=r"'the_bn'.*scale.*not a constant"):
        fold_onnx_batch_norms(model)


@pytest.mark.parametrize(
    ("label", "values", "message"),
    [
        ("mean", [0.0, np.nan, 1.0], "non-finite values in mean"),
        ("scale", [1.0, np.inf, 1.0], "non-finite values in scale"),
        ("var", [1.0, -1.0, 1.0], "var \\+ epsilon <= 0"),
    ],
)
def test_bad_statistics_are_refused(label: str, values: list[float], message: str) -> None:
    model = bn_model()
    for initializer in model.graph.initializer:
        if initializer.name == f"the_bn.{label}":
            initializer.CopyFrom(tensor(initializer.name, np.array(values)))
    with pytest.raises(FoldingError, match=rf"'the_bn' has {message}"):
        fold_onnx_batch_norms(model)


def test_bn_inside_a_subgraph_is_refused() -> None:
    bn, stats = batch_norm("inner", "x", "y", 3, 0)
    branch = helper.make_graph([bn], "branch", [], [output("y", 3)], stats)
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y2"])], "other", [], [output("y2", 3)]
    )
    condition = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["out"], name="if", then_branch=branch, else_branch=other)
    graph = helper.make_graph([node], "g", [condition, value("x", ["N", 3, 4])], [output("out", 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    with pytest.raises(FoldingError, match=r"'inner' in a subgraph of If 'if'"):
        fold_onnx_batch_norms(model)


# ---------------------------------------------------------------- a model exported by torch


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_torch_legacy_export_folds_like_the_torch_path(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from foldserve.fold import fold_batch_norms, stats_sha256

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # after a ReLU, before a padded conv: frozen affine
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.BatchNorm1d(4 * 8 * 8),  # before a Linear: folded into it
        nn.Linear(4 * 8 * 8, 5),
    ).eval()
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in batch_norms:
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1.0, 0.5)
            bn.bias.normal_()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 6, 6),),
        path,
        dynamo=False,
        do_constant_folding=False,
        opset_version=OPSET,
        training=torch.onnx.TrainingMode.EVAL,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    exported = onnx.load(path)
    ops = [node.op_type for node in exported.graph.node]
    assert ops.count("BatchNormalization") == 5
    assert dynamic_batch_problem(exported) is None

    result = fold_onnx_batch_norms(exported)
    assert_same_outputs(exported, result.model, (3, 6, 6))
    x = torch.randn(5, 3, 6, 6)
    (folded_output,) = run(result.model, x.numpy())
    expected = model(x).detach().numpy()
    assert np.abs(folded_output - expected).max() <= 1e-4 * np.abs(expected).max()

    torch_records = fold_batch_norms(model, torch.randn(2, 3, 6, 6)).records
    placements = [r.placement for r in result.records]
    assert placements == [r.placement for r in torch_records]
    assert placements == [
        "folded_into_previous",
        "frozen_affine",
        "folded_into_previous",
        "folded_into_previous",
        "folded_into_next",
    ]
    assert [r.stats_sha256 for r in result.records] == [stats_sha256(bn) for bn in batch_norms]


# torch.export calls a pytree API that typing_extensions marks deprecated.
@pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
)
def test_torch_dynamo_export_keeps_unfoldable_bns_and_they_fold_here() -> None:
    import torch
    from torch import nn

    # The dynamo exporter folds a BN into the conv before it itself; one after a ReLU stays.
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), bn, nn.Conv2d(4, 2, 1))
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.onnx.export(
        model.eval(), (torch.randn(2, 3, 6, 6),), dynamo=True, dynamic_shapes=({0: batch},)
    )
    assert exported is not None
    onnx_model = exported.model_proto
    assert [n.op_type for n in onnx_model.graph.node].count("BatchNormalization") == 1
    result = fold_onnx_batch_norms(onnx_model)
    assert [r.placement for r in result.records] == ["folded_into_next"]
    assert_same_outputs(onnx_model, result.model, (3, 6, 6))


def test_module_imports_no_torch() -> None:
    code = "import sys, foldserve.onnx_fold; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the batch dimension


def flatten_model(batch: int | str, shape: list[int] | None = None) -> onnx.ModelProto:
    """x (batch, 2, 3) -> Flatten, or Reshape to ``shape`` -> (batch, 6)."""
    if shape is None:
        node = helper.make_node("Flatten", ["x"], ["y"], name="flatten")
        initializers = []
    else:
        node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")
        initializers = [numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")]
    return make([node], initializers, [value("x", [batch, 2, 3])], [value("y", [batch, 6])])


def test_dynamic_batch_has_no_problem() -> None:
    assert dynamic_batch_problem(flatten_model("N")) is None
    unknown = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    graph = helper.make_graph([], "g", [unknown], [unknown])
    assert dynamic_batch_problem(helper.make_model(graph)) is None


@pytest.mark.parametrize(
    ("producer", "fix"),
    [
        ("pytorch", "dynamic_axes={'x': {0: 'batch'}}"),
        ("tf2onnx", "tf2onnx --inputs x[-1,...]"),
        ("skl2onnx", "initial_types with None as the batch dimension"),
        ("", "a dynamic (symbolic) batch dimension on every input and output"),
    ],
)
def test_fixed_batch_is_reported_with_the_exporters_fix(producer: str, fix: str) -> None:
    model = flatten_model(1)
    model.producer_name = producer
    problem = dynamic_batch_problem(model)
    assert problem is not None
    assert "input 'x' has a fixed batch dimension of 1" in problem
    assert fix in problem


@pytest.mark.parametrize("shape", [None, [0, -1], [-1, 6]])
def test_fixed_batch_is_made_dynamic(shape: list[int] | None) -> None:
    dynamic = make_batch_dynamic(flatten_model(1, shape))
    assert dynamic_batch_problem(dynamic) is None
    assert dynamic.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    (y,) = run(dynamic, x)
    np.testing.assert_array_equal(y, x.reshape(5, 6))


def test_reshape_that_hard_codes_the_batch_is_refused() -> None:
    with pytest.raises(FoldingError, match=r"Reshape 'reshape' hard-codes the batch size"):
        make_batch_dynamic(flatten_model(1, [1, 6]))


def test_output_with_a_fixed_batch_after_inference_is_refused() -> None:
    # The target shape comes through a Concat, which the Reshape scan does not read.
    nodes = [
        helper.make_node("Concat", ["one", "six"], ["shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape"),
    ]
    initializers = [
        numpy_helper.from_array(np.array([2], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([6], dtype=np.int64), "six"),
    ]
    model = make(nodes, initializers, [value("x", [2, 2, 3])], [value("y", [2, 6])])
    with pytest.raises(FoldingError, match=r"output 'y' still has a fixed dim 0 of 2"):
        make_batch_dynamic(model)


def test_bn_output_that_is_also_a_graph_output_is_not_folded_into_next() -> None:
    nodes, stats = relu_bn(4)
    conv = helper.make_node("Conv", ["z", "w"], ["y"], name="conv")
    model = make(
        [*nodes, conv],
        [weights("w", (2, 4, 1, 1), 2), *stats],
        [value("x", ["N", 4, 3, 3])],
        [output("y", 4), output("z", 4)],
    )
    fold_and_check(model, (4, 3, 3), [("bn", "frozen_affine", None)])


def test_statistics_also_read_by_another_node_are_kept() -> None:
    nodes, stats = relu_bn(4)
    nodes.append(helper.make_node("Add", ["z", "bn.mean"], ["y"], name="reader"))
    model = make(nodes, stats, [value("x", ["N", 4])], [output("y", 2)])
    result = fold_and_check(model, (4,), [("bn", "frozen_affine", None)])
    assert "bn.mean" in {t.name for t in result.model.graph.initializer}


def reshaped_bn_model(consumer: onnx.NodeProto, extra: list[onnx.TensorProto]) -> onnx.ModelProto:
    """x reshaped to a run-time shape ``s``, so shape inference cannot tell the BN input's rank."""
    bn, stats = batch_norm("bn", "r", "z", 3, 1)
    reshape = helper.make_node("Reshape", ["x", "s"], ["r"], name="reshape")
    inputs = [value("x", ["N", 27]), helper.make_tensor_value_info("s", TensorProto.INT64, ["k"])]
    return make([reshape, bn, consumer], [*stats, *extra], inputs, [output("y", 4)])


def test_unknown_rank_is_taken_from_the_conv_after_the_bn() -> None:
    conv = helper.make_node("Conv", ["z", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = reshaped_bn_model(conv, [weights("w", (2, 3, 3, 3), 0)])
    result = fold_onnx_batch_norms(model)
    assert [(r.placement, r.target) for r in result.records] == [("frozen_affine", None)]
    feeds = {
        "x": np.random.default_rng(0).standard_normal((5, 27)).astype(np.float32),
        "s": np.array([5, 3, 3, 3], dtype=np.int64),
    }
    outputs = []
    for candidate in (model, result.model):
        session = ort.InferenceSession(
            candidate.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        outputs.append(session.run(None, feeds)[0])
    expected, actual = outputs
    assert np.abs(actual - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


def test_unknown_rank_without_a_conv_like_neighbour_is_refused() -> None:
    model = reshaped_bn_model(helper.make_node("Relu", ["z"], ["y"], name="relu"), [])
    with pytest.raises(FoldingError, match=r"'bn': the rank of its input is unknown"):
        fold_onnx_batch_norms(model)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("bias_shape", [(1, 4, 1, 1), (4, 1, 1), (1,)])
def test_a_conv_bias_added_apart_and_an_identity_are_looked_through(
    conv_bias: bool, bias_shape: tuple[int, ...]
) -> None:
    """paddle2onnx's pattern: Conv, then Add of the layer's bias, then an Identity, then the BN.
    The BN folds into the conv (not a frozen Mul/Add) and the Identity is gone."""
    rng = np.random.default_rng(3)
    initializers = [weights("w", [4, 3, 3, 3], 1), tensor("b_add", rng.standard_normal(bias_shape))]
    if conv_bias:
        initializers.append(tensor("b_conv", rng.standard_normal(4)))
    conv = helper.make_node(
        "Conv", ["x", "w", *(["b_conv"] if conv_bias else [])], ["h"], name="conv", pads=[1] * 4
    )
    add = helper.make_node("Add", ["h", "b_add"], ["biased"], name="add")
    identity = helper.make_node("Identity", ["biased"], ["same"], name="identity")
    bn, stats = batch_norm("bn", "same", "n", 4, seed=5)
    relu = helper.make_node("Relu", ["n"], ["y"], name="relu")
    model = make(
        [conv, add, identity, bn, relu],
        initializers + stats,
        [value("x", ["N", 3, 6, 6])],
        [output("y", 4)],
    )
    result = fold_and_check(model, (3, 6, 6), [("bn", "folded_into_previous", "conv")])
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Add", "Relu"]


def test_an_identity_naming_a_graph_output_is_kept() -> None:
    w = weights("w", [3, 3], 0)
    gemm = helper.make_node("Gemm", ["x", "w"], ["h"], name="gemm")
    bn, stats = batch_norm("bn", "h", "n", 3, seed=1)
    identity = helper.make_node("Identity", ["n"], ["y"], name="identity")
    model = make([gemm, bn, identity], [w, *stats], [value("x", ["N", 3])], [output("y", 2)])
    result = fold_and_check(model, (3,), [("bn", "folded_into_previous", "gemm")])
    assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Identity"]
