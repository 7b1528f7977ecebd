"""Image-sized inputs (3x224x224 float32: 0.6 MB a sample, ~3 MB as JSON) with default settings:
requests of a few images pass (as V2 binary; one as JSON), limits name their setting, and loading
stays cheap."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import numpy as np
import onnx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import service.batching_policy as policy
from service.admission import Admission
from service.app import create_app
from service.backends import Backend
from service.errors import Overloaded, PayloadTooLarge
from service.registry import Registry
from service.settings import Settings
from service.store import read_manifest
from service.telemetry import Telemetry
from service.verify import (
    INVARIANCE_BATCH_SIZES,
    INVARIANCE_BUDGET_VALUES,
    invariance_batch_sizes,
)
from service.versions import Status, VersionRecord
from tests.service.conftest import add_onnx_version, onnx_reference, running

IMAGE = (3, 224, 224)
SAMPLE_BYTES = 4 * math.prod(IMAGE)
CLASSES = [f"class-{i}" for i in range(10)]
INFER = "/v2/models/image/infer"
LENGTH = "Inference-Header-Content-Length"


def image_classifier() -> bytes:
    """Conv 8x8 stride 8 -> ReLU -> global average pool -> Gemm: a cheap model for big inputs."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.normal(size=(8, 3, 8, 8)) / 8).astype(np.float32), "K"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "KB"),
        numpy_helper.from_array(rng.normal(size=(10, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=10).astype(np.float32), "B"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "K", "KB"], ["conv"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "image",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", len(CLASSES)])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *IMAGE)).astype(np.float32)


@pytest.fixture(scope="module")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "store"
    add_onnx_version(root, "image", image_classifier(), images(2, seed=0), labels=CLASSES)
    return root


@pytest.fixture(scope="module")
def default_server(image_store: Path) -> Iterator[str]:
    """Every setting at its default but the store and the default model."""
    config = Settings(model_store=image_store, default_model="image")
    with running(create_app(config)) as (base, _):
        yield base


def binary_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A V2 request with a binary tensor, as tritonclient sends it."""
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    header = orjson.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    return header + x.tobytes(), {LENGTH: str(len(header))}


def binary_outputs(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    length = int(response.headers[LENGTH])
    (output,) = orjson.loads(response.content[:length])["outputs"]
    return np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])


def test_one_image_as_json_four_as_v2_binary_with_default_settings(
    default_server: str, image_store: Path
) -> None:
    x = images(4, seed=1)
    one_as_json = orjson.dumps({"inputs": x[:1].tolist()})
    four_as_json = orjson.dumps({"inputs": x.tolist()})
    assert len(four_as_json) > Settings().max_json_bytes  # the premise: JSON this big is refused
    content, headers = binary_request(x)
    with httpx.Client(base_url=default_server, timeout=30) as client:
        by_json = client.post("/predict", content=one_as_json)
        too_big = client.post("/predict", content=four_as_json)
        by_binary = client.post(INFER, content=content, headers=headers)
    expected = onnx_reference(image_store / "image" / "1", x)
    assert by_json.status_code == 200, by_json.text
    np.testing.assert_array_equal(np.asarray(by_json.json()["outputs"], np.float32), expected[:1])
    assert by_json.json()["predictions"] == [CLASSES[i] for i in expected[:1].argmax(axis=1)]
    assert too_big.status_code == 413
    assert "exceeds max_json_bytes" in too_big.json()["error"]
    np.testing.assert_array_equal(binary_outputs(by_binary), expected)


def test_the_queue_is_bounded_in_bytes_and_loading_stays_cheap(default_server: str) -> None:
    defaults = Settings()
    by_bytes = defaults.max_queue_bytes // SAMPLE_BYTES
    assert by_bytes < defaults.max_queue_rows  # the premise: for images, bytes bind first
    (model,) = httpx.get(f"{default_server}/models").json()["models"]
    (version,) = model["versions"]
    assert version["status"] == "ready"
    batching = version["batching"]
    assert batching["max_queue_rows"] == by_bytes
    assert f"FOLDSERVE_MAX_QUEUE_BYTES={defaults.max_queue_bytes}" in batching["queue_limit"]
    config = httpx.get(f"{default_server}/v2/models/image/config").json()
    assert config["max_batch_size"] == by_bytes  # the most rows one request may carry
    # Invariance batches within the budget per probe, a batch of 2 always among them; fewer
    # sizes than for a small input, and bitwise invariance left unmeasured unasked.
    sizes = version["tolerance"]["batch_invariance"]["batch_sizes"]
    assert sizes[0] == 2 and set(sizes) < set(INVARIANCE_BATCH_SIZES)
    assert (1 + sum(sizes)) * math.prod(IMAGE) <= INVARIANCE_BUDGET_VALUES
    bits = version["bitwise_batch_invariance"]
    assert bits["measured"] is None and bits["note"].startswith("not measured here")


def test_limits_name_their_setting_and_value(image_store: Path) -> None:
    old_body_limit = 4 << 20
    queue_bytes = 3 * SAMPLE_BYTES + 1  # room for 3 images
    config = Settings(
        model_store=image_store,
        default_model="image",
        max_json_bytes=old_body_limit,
        max_queue_bytes=queue_bytes,
    )
    x = images(4, seed=2)
    as_json = orjson.dumps({"inputs": x.tolist()})
    four, headers_four = binary_request(x)
    three, headers_three = binary_request(x[:3])
    with running(create_app(config)) as (base, _), httpx.Client(base_url=base) as client:
        too_big = client.post("/predict", content=as_json)
        too_many = client.post(INFER, content=four, headers=headers_four)
        fits = client.post(INFER, content=three, headers=headers_three)
    assert too_big.status_code == 413
    assert too_big.json()["error"] == (
        f"request body of {len(as_json) / 1e6:.1f} MB exceeds max_json_bytes "
        f"(FOLDSERVE_MAX_JSON_BYTES={old_body_limit})"
    )
    assert too_many.status_code == 413
    message = too_many.json()["error"]
    assert "request has 4 rows but at most 3 can queue for model 'image' v1" in message
    assert f"max_queue_bytes (FOLDSERVE_MAX_QUEUE_BYTES={queue_bytes})" in message
    np.testing.assert_array_equal(
        binary_outputs(fits), onnx_reference(image_store / "image" / "1", x[:3])
    )


def test_a_queue_too_small_for_one_sample_fails_the_load_and_says_why(image_store: Path) -> None:
    config = Settings(model_store=image_store, default_model="image", max_queue_bytes=1024)

    async def main() -> VersionRecord:
        registry = Registry(config, Telemetry())
        await registry.load_all()
        (entry,) = registry.entries()
        return entry

    entry = asyncio.run(main())
    assert entry.status is Status.FAILED
    # Refused before any verification, before the runtime was even opened.
    assert entry.learned.report is None and entry.learned.backend is None
    assert entry.reason == (
        "max_queue_bytes (FOLDSERVE_MAX_QUEUE_BYTES=1024) cannot hold one sample of this model "
        f"({SAMPLE_BYTES} bytes of float32 input): raise it to at least {SAMPLE_BYTES}"
    )


class _Queue:
    def __init__(self, rows: int) -> None:
        self.queue_rows = rows

    def estimated_wait(self, rows: int) -> float:
        return 0.0

    def now(self) -> float:
        return asyncio.get_running_loop().time()


def test_a_full_queue_waits_for_room_then_answers_503_naming_the_limit() -> None:
    limit = "max_queue_bytes (FOLDSERVE_MAX_QUEUE_BYTES=2000000), 602112 bytes per sample"
    queue = _Queue(2)
    admission = Admission("image", 1, queue, 3, limit)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ticket, other = await admission.enter(None), await admission.enter(None)
        await ticket.admit(1, None)  # 2 + 1 rows fit
        with pytest.raises(PayloadTooLarge, match=r"at most 3 can queue .*MAX_QUEUE_BYTES"):
            await ticket.admit(4, None)
        # No room for 2 rows: it waits, and when another request's answer frees room it goes.
        waiting = asyncio.ensure_future(ticket.admit(2, loop.time() + 5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        queue.queue_rows = 0
        other.leave()
        await asyncio.wait_for(waiting, 1)
        # No room before its deadline: 503, naming the limit.
        queue.queue_rows = 3
        with pytest.raises(Overloaded) as full:
            await ticket.admit(2, loop.time() + 0.05)
        assert full.value.message == (
            f"queue full for model 'image' v1: 3 of 3 rows wait ({limit}), no room for 2 more "
            "before the request's deadline; retry shortly"
        )
        assert full.value.headers() == {"Retry-After": "1"}
        ticket.leave()

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(values=st.integers(1, 1 << 22), cap=st.one_of(st.none(), st.integers(1, 128)))
def test_invariance_batch_sizes_keep_a_batch_of_two_and_fit_the_cap_and_budget(
    values: int, cap: int | None
) -> None:
    sizes = invariance_batch_sizes(values, cap)
    largest = max(2, cap) if cap is not None else max(INVARIANCE_BATCH_SIZES)
    candidates = sorted({min(size, largest) for size in INVARIANCE_BATCH_SIZES})
    assert sizes[0] == 2
    assert sizes == tuple(candidates[: len(sizes)])  # the smallest ones, in order
    if len(sizes) > 1:
        assert (1 + sum(sizes)) * values <= INVARIANCE_BUDGET_VALUES
    if len(sizes) < len(candidates):  # dropped only because the next one would not fit
        assert (1 + sum(sizes) + candidates[len(sizes)]) * values > INVARIANCE_BUDGET_VALUES


def test_timing_a_slow_full_batch_stops_at_its_budget(
    image_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Slow:
        calls = 0

        def run(self, batch: np.ndarray) -> np.ndarray:
            self.calls += 1
            time.sleep(0.02)
            return np.zeros((len(batch), len(CLASSES)), dtype=np.float32)

    monkeypatch.setattr(policy, "_TIMING_BUDGET_S", 0.05)
    slow = Slow()
    milliseconds = policy.full_batch_ms(
        cast(Backend, slow), read_manifest(image_store / "image" / "1"), 2
    )
    assert milliseconds >= 20
    # A warm-up, then runs until they add up to the budget: 3 of 20 ms, not all 7.
    assert slow.calls == 1 + 3
