"""A model of two named inputs and two named outputs, as ONNX, for the tests of several tensors.

``a`` (3 values per sample) and ``b`` (2x2 per sample) in; ``logits`` (4, a classifier's, over
both inputs) and ``scaled`` (2x2: 3 * b) out. Each output depends on its own sample's inputs only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.store import BatchingConfig
from tests.service.conftest import add_onnx_version

A_SHAPE, B_SHAPE = (3,), (2, 2)
LABELS = ["w", "x", "y", "z"]


def pair_onnx() -> bytes:
    rng = np.random.default_rng(11)
    weights = {
        "wa": rng.normal(size=(3, 4)).astype(np.float32),
        "wb": rng.normal(size=(4, 4)).astype(np.float32),
        "bias": rng.normal(size=(4,)).astype(np.float32),
        "three": np.asarray(3.0, dtype=np.float32),
    }
    nodes = [
        helper.make_node("Flatten", ["b"], ["b_flat"], axis=1),
        helper.make_node("MatMul", ["a", "wa"], ["from_a"]),
        helper.make_node("MatMul", ["b_flat", "wb"], ["from_b"]),
        helper.make_node("Add", ["from_a", "from_b"], ["summed"]),
        helper.make_node("Add", ["summed", "bias"], ["logits"]),
        helper.make_node("Mul", ["b", "three"], ["scaled"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pair",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", *A_SHAPE]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", *B_SHAPE]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["n", *B_SHAPE]),
        ],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def pair_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.normal(size=(n, *A_SHAPE)).astype(np.float32),
        "b": rng.normal(size=(n, *B_SHAPE)).astype(np.float32),
    }


def add_pair_version(
    root: Path, name: str = "pair", batching: BatchingConfig | None = None
) -> Path:
    return add_onnx_version(
        root, name, pair_onnx(), pair_inputs(6), labels=LABELS, batching=batching
    )


def pair_reference(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What onnxruntime computes on the model for these inputs, by output name."""
    session = ort.InferenceSession(pair_onnx(), providers=["CPUExecutionProvider"])
    feeds = {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    return dict(zip(["logits", "scaled"], session.run(["logits", "scaled"], feeds), strict=True))
