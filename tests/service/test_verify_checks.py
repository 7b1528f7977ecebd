"""The load-time checks themselves: they must refuse what they exist to refuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.backends import Array, BackendOptions
from service.backends.onnx import OnnxBackend, _find_ops
from service.errors import VerificationError
from service.settings import BackendName
from service.store import Manifest, read_manifest
from service.verify import (
    INVARIANCE_ATOL,
    check_batch_invariance,
    check_golden,
    golden_inputs,
    verify_loaded_model,
    wild_mates,
    within_tolerance,
)

SHIPPED = Path(__file__).resolve().parents[2] / "model_store" / "digits-mlp" / "1"


class FakeBackend:
    """A backend made of a numpy function; ``leak`` adds a batch-dependent term of that size."""

    format: BackendName = "onnx"
    device = "cpu"

    def __init__(self, weights: Array, leak: float = 0.0) -> None:
        self.weights = weights
        self.leak = leak

    def run(self, batch: Array) -> Array:
        flat = batch.reshape(len(batch), -1)
        out = flat @ self.weights
        return (out + self.leak * flat.mean(axis=0).sum()).astype(np.float32)

    def batch_statistics_ops(self) -> list[str]:
        return []


def manifest_for(backend: FakeBackend, **verification: Any) -> Manifest:
    data = read_manifest(SHIPPED).model_dump()
    data["verification"].update(verification)
    manifest = Manifest.model_validate(data)
    outputs = backend.run(golden_inputs(manifest))
    data["golden"]["outputs"] = outputs.tolist()
    return Manifest.model_validate(data)


def test_tolerance_never_passes_nan_or_inf() -> None:
    good = np.array([[1.0, 2.0]], dtype=np.float32)
    assert within_tolerance(good, good + 1e-5, atol=1e-4, rtol=0.0)
    assert not within_tolerance(good, good + 1e-3, atol=1e-4, rtol=0.0)
    for bad in (np.nan, np.inf):
        broken = good.copy()
        broken[0, 0] = bad
        with pytest.raises(VerificationError, match="non-finite"):
            within_tolerance(good, broken, atol=1e-4, rtol=1e-4)
        with pytest.raises(VerificationError, match="non-finite"):
            within_tolerance(broken, good, atol=1e-4, rtol=1e-4)


def test_a_small_batch_dependence_is_refused_even_if_the_manifest_allows_it() -> None:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, 10)).astype(np.float32) / 8
    honest = FakeBackend(weights)
    report = verify_loaded_model(manifest_for(honest, atol=1e-3), honest)
    assert report.batch_invariance_max_diff <= INVARIANCE_ATOL

    # 1e-5 per unit of batch-mean pixel sum moves outputs (~10) by ~5e-3 between batches: under
    # the artifact's own bound (atol and rtol 1e-3), over the server's ceiling (1e-4 each).
    leaky = FakeBackend(weights, leak=1e-5)
    mates = wild_mates(golden_inputs(manifest_for(leaky)), np.random.default_rng(0))
    loose = check_batch_invariance(
        leaky,
        golden_inputs(manifest_for(leaky))[:4],
        mates,
        atol=1e-3,
        rtol=1e-3,
        rng=np.random.default_rng(0),
    )
    assert loose > INVARIANCE_ATOL
    with pytest.raises(VerificationError, match="shares a batch"):
        verify_loaded_model(manifest_for(leaky, atol=1e-3, rtol=1e-3), leaky)


def test_golden_check_refuses_outputs_of_another_shape() -> None:
    rng = np.random.default_rng(1)
    backend = FakeBackend(rng.normal(size=(64, 10)).astype(np.float32))
    data = manifest_for(backend).model_dump()
    data["outputs"] = [{"name": "logits", "shape": [2, 5]}]
    with pytest.raises(VerificationError, match=r"shaped \(10,\) per sample"):
        check_golden(backend, Manifest.model_validate(data))


def _batch_norm_inside_if() -> onnx.GraphProto:
    bn_inputs = ["x", "scale", "bias", "mean", "var"]
    branch = helper.make_graph(
        [helper.make_node("BatchNormalization", bn_inputs, ["y"], name="hidden_bn")],
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    identity = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y2"])],
        "else",
        [],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
    )
    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=identity)
    return helper.make_graph([node], "g", [], [])


def test_batch_norm_hidden_in_a_subgraph_is_found() -> None:
    found = _find_ops(_batch_norm_inside_if().node, "graph")
    assert len(found) == 1
    assert "BatchNormalization (hidden_bn" in found[0]


def test_shipped_models_hold_no_batch_statistics_ops() -> None:
    for name in ("digits-mlp", "digits-cnn"):
        directory = SHIPPED.parent.parent / name / "1"
        backend = OnnxBackend(directory / "model.onnx", BackendOptions(device="cpu"))
        assert backend.batch_statistics_ops() == []


@pytest.mark.parametrize(
    ("leak", "cause"), [(1e-5, "float32 rounding"), (1e-2, "normalizes with batch statistics")]
)
def test_the_refusal_blames_batch_statistics_only_for_a_large_change(
    leak: float, cause: str
) -> None:
    weights = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32) / 8
    leaky = FakeBackend(weights, leak=leak)
    with pytest.raises(VerificationError, match=cause):
        verify_loaded_model(manifest_for(leaky), leaky)
