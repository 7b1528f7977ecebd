"""Bitwise batch invariance: measured at load on this runtime, required by a setting, shown in
/models beside the manifest's claim and the tolerance the other checks use."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import service.loader as loader_module
from service.app import create_app
from service.backends import Array
from service.errors import BackendError
from service.registry import Registry, Status
from service.settings import BackendName, Settings
from service.telemetry import Telemetry
from service.verify import (
    BITWISE_BUDGET_VALUES,
    INVARIANCE_ATOL,
    TOLERANCE_BASIS,
    bitwise_cost,
    measure_bitwise,
)
from tests.service.conftest import add_onnx_version, onnx_reference, serve

# The leaky model adds LEAK * tanh(mean over the batch): a change of at most 2 * LEAK, far
# inside the batch-invariance tolerance (atol 1e-5 here), yet several float32 steps of outputs
# near 1, so never bit for bit the same.
LEAK = 2e-6
CLAIMED_ROWS = 64


def linear_graph(leak: float) -> bytes:
    """x (n, 2, 8) -> flatten -> x @ W + b [+ leak * tanh(mean of that over the batch)]."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.normal(size=(16, 4)) / 4).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B"),
        numpy_helper.from_array(np.array(leak, dtype=np.float32), "LEAK"),
    ]
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["product"]),
        helper.make_node("Add", ["product", "B"], ["affine"]),
    ]
    if leak:
        nodes += [
            helper.make_node("ReduceMean", ["affine"], ["mean"], axes=[0], keepdims=1),
            helper.make_node("Tanh", ["mean"], ["squashed"]),
            helper.make_node("Mul", ["squashed", "LEAK"], ["term"]),
            helper.make_node("Add", ["affine", "term"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["affine"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def bitwise_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``exact`` (no batch term) and ``leaky``; both manifests claim bitwise invariance, as an
    exporter on another runtime might have: the server must measure, not believe."""
    root = tmp_path_factory.mktemp("bitwise") / "store"
    golden = np.random.default_rng(1).normal(size=(8, 2, 8)).astype(np.float32)
    claim = (True, CLAIMED_ROWS)
    add_onnx_version(root, "exact", linear_graph(0.0), golden, bitwise_claim=claim)
    add_onnx_version(root, "leaky", linear_graph(LEAK), golden, bitwise_claim=claim)
    return root


def registry_for(root: Path, **overrides: object) -> Registry:
    config = Settings(model_store=root, default_model="exact", **overrides)  # type: ignore[arg-type]
    return Registry(config, Telemetry())


def test_the_leaky_model_is_within_tolerance_but_not_bit_for_bit(bitwise_store: Path) -> None:
    """The premise of the tests below, checked on the file itself."""
    x = np.random.default_rng(2).normal(size=(8, 2, 8)).astype(np.float32)
    for name in ("exact", "leaky"):
        version = bitwise_store / name / "1"
        alone = np.concatenate([onnx_reference(version, row[np.newaxis]) for row in x])
        together = onnx_reference(version, x)
        assert np.abs(together - alone).max() <= 2 * LEAK < INVARIANCE_ATOL
        assert np.array_equal(together, alone) == (name == "exact")


@pytest.mark.parametrize("required", [True, False])
def test_require_bitwise_invariance_refuses_only_a_model_that_is_not(
    bitwise_store: Path, required: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> Registry:
        registry = registry_for(bitwise_store, require_bitwise_invariance=required)
        with caplog.at_level(logging.INFO, logger="service.registry"):
            await registry.load_all()
        await registry.stop()
        return registry

    exact, leaky = asyncio.run(main()).entries()
    assert exact.status is Status.STOPPED  # was ready, then stopped
    assert exact.learned.bitwise is not None and exact.learned.bitwise.invariant is True
    assert leaky.learned.bitwise is not None and leaky.learned.bitwise.invariant is False
    assert leaky.learned.bitwise.first_difference == 2
    if not required:
        assert leaky.status is Status.STOPPED and leaky.reason is None
        return
    assert leaky.status is Status.FAILED
    reason = leaky.reason or ""
    assert "require_bitwise_invariance (FOLDSERVE_REQUIRE_BITWISE_INVARIANCE=true)" in reason
    assert "in a batch of 2 are not bit for bit the same" in reason
    assert f"bitwise_batch_invariant=True up to {CLAIMED_ROWS} rows at export" in reason
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("leaky v1" in line and "NOT served" in line and reason in line for line in logged)


@pytest.mark.parametrize("required", [True, False])
def test_a_measurement_that_fails_refuses_only_when_required(
    bitwise_store: Path, required: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise BackendError("the runtime fell over")

    monkeypatch.setattr(loader_module, "measure_bitwise", broken)

    async def main() -> Registry:
        registry = registry_for(bitwise_store, require_bitwise_invariance=required)
        await registry.load_all()
        await registry.stop()
        return registry

    exact, _ = asyncio.run(main()).entries()
    assert exact.learned.bitwise is not None and exact.learned.bitwise.invariant is None
    assert exact.learned.bitwise.note == "measurement failed: the runtime fell over"
    assert (exact.status is Status.FAILED) == required
    if required:
        assert "measurement failed: the runtime fell over" in (exact.reason or "")


@pytest.mark.parametrize("required", [True, False])
def test_models_show_the_claim_the_measurement_and_the_tolerance(
    bitwise_store: Path, required: bool
) -> None:
    config = Settings(
        model_store=bitwise_store, default_model="exact", require_bitwise_invariance=required
    )
    x = np.random.default_rng(3).normal(size=(3, 2, 8)).astype(np.float32)
    with serve(create_app(config)) as base:
        listed = httpx.get(f"{base}/models").json()
        answer = httpx.post(f"{base}/models/leaky/predict", json={"inputs": x.tolist()})
    versions = {m["name"]: m["versions"][0] for m in listed["models"]}
    for name, measured in (("exact", True), ("leaky", False)):
        bits = versions[name]["bitwise_batch_invariance"]
        assert bits["manifest"] == {"bitwise_batch_invariant": True, "max_rows": CLAIMED_ROWS}
        assert bits["measured"] is measured
        assert bits["max_rows"] == 64  # the manifest's row cap: no override here
    leaky = versions["leaky"]
    if required:
        assert leaky["status"] == "failed" and "FOLDSERVE_REQUIRE_BITWISE" in leaky["reason"]
        assert answer.status_code == 503
        assert "not bit for bit" in answer.json()["error"]
        return
    assert leaky["status"] == "ready"
    assert leaky["tolerance"] == {
        "golden": {"atol": 1e-5, "rtol": 1e-5},
        "batch_invariance": {"atol": 1e-5, "rtol": 1e-5, "batch_sizes": [2, 7, 32]},
        "basis": TOLERANCE_BASIS,
    }
    assert answer.status_code == 200
    expected = onnx_reference(bitwise_store / "leaky" / "1", x)
    np.testing.assert_allclose(answer.json()["outputs"], expected, rtol=0, atol=2 * LEAK)


class CountingBackend:
    """A row-wise numpy model that counts the input values it is given.

    NOTE: element-wise on purpose: a matrix product through BLAS is not bit for bit the same
    for one row and for several, and the measurement would stop at the first batch.
    """

    format: BackendName = "onnx"
    device = "cpu"

    def __init__(self) -> None:
        self.seen = 0

    def run(self, batch: Array) -> Array:
        self.seen += batch.size
        out: Array = batch.reshape(len(batch), -1)[:, :3] * np.float32(2.0)
        return out

    def batch_statistics_ops(self) -> list[str]:
        return []


@pytest.mark.parametrize("values", [16, 20_000])
def test_bitwise_is_measured_unasked_only_within_its_budget(values: int) -> None:
    probes = np.random.default_rng(4).normal(size=(3, values)).astype(np.float32)
    cost = bitwise_cost(probes, 64)
    cheap = cost <= BITWISE_BUDGET_VALUES
    assert cheap == (values == 16)  # the premise: one of each
    unasked, asked = CountingBackend(), CountingBackend()
    skipped = measure_bitwise(unasked, probes, 64, required=False)
    measured = measure_bitwise(asked, probes, 64, required=True)
    assert asked.seen == cost  # the cost is exactly what the measurement runs
    assert measured.invariant is True and measured.max_rows == 64
    if cheap:
        assert skipped == measured and unasked.seen == cost
    else:
        assert skipped.invariant is None and unasked.seen == 0
        assert skipped.note.startswith("not measured here")
