"""End to end through the production server: answers, batching, batch invariance, backends."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import BatchingOverride, Settings
from tests.service.conftest import CLASSES, SHAPE, reference, serve


def settings(store: Path, **overrides: Any) -> Settings:
    # Tests pin how requests batch; the adaptive delay (on by default) sends a request that
    # arrives into an idle server alone, so it is off here unless a test turns it on.
    return Settings(
        model_store=store, default_model="tiny", **{"adaptive_delay": False, **overrides}
    )


def samples(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, *SHAPE)) * scale).astype(np.float32)


def outputs(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"], dtype=np.float32)


def metric_samples(base: str, name: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(name):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def test_predictions_equal_the_model_files_own_outputs(store: Path) -> None:
    x = samples(5, seed=2)
    bodies = {
        "/predict": {"inputs": x.tolist()},
        "/models/tiny/predict": {"inputs": x.reshape(5, -1).tolist()},  # flat samples
        "/models/tiny/versions/1/predict": {"inputs": x.tolist()},
    }
    with serve(create_app(settings(store))) as base:
        answers = {path: httpx.post(base + path, json=body) for path, body in bodies.items()}
        named = httpx.post(f"{base}/predict", json={"inputs": x.tolist(), "model": "tiny"})
    expected = reference(store, x)
    for response in [*answers.values(), named]:
        np.testing.assert_array_equal(outputs(response), expected)
        body = response.json()
        assert (body["model"], body["version"]) == ("tiny", 1)
        assert body["predictions"] == [CLASSES[i] for i in expected.argmax(axis=1)]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(store: Path) -> None:
    rng = np.random.default_rng(3)
    inputs = [samples(int(rng.integers(1, 4)), seed=100 + i) for i in range(96)]

    async def send_all(base: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=128)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
            posts = [client.post("/predict", json={"inputs": x.tolist()}) for x in inputs]
            return await asyncio.gather(*posts)

    with serve(create_app(settings(store, max_delay_ms=20.0))) as base:
        responses = asyncio.run(send_all(base))
        batches = metric_samples(base, "foldserve_batch_size")
    for x, response in zip(inputs, responses, strict=True):
        np.testing.assert_allclose(outputs(response), reference(store, x), rtol=0, atol=1e-5)
    key = "{model=tiny,version=1}"
    rows = sum(len(x) for x in inputs)
    # Verification at load calls the backend directly; only batcher calls are counted here.
    assert batches[f"foldserve_batch_size_sum{key}"] == rows
    assert batches[f"foldserve_batch_size_count{key}"] < len(inputs)  # so batches held > 1 request
    assert batches["foldserve_batch_size_bucket{le=1.0,model=tiny,version=1}"] < len(inputs)


# NOTE: also with a batch's rows split across two one-thread runs (service.parallel_runs):
# a request's answer must not depend on which session, or which part, its rows ran in.
@pytest.mark.parametrize(
    "split",
    [{}, {"parallel_runs": 2, "intra_op_threads": 2, "inline_max_ms": 0.0}],
    ids=["one-run", "parallel-runs"],
)
def test_a_probe_is_identical_alone_and_among_wild_batch_mates(
    store: Path, split: dict[str, Any]
) -> None:
    probe = samples(1, seed=7)
    rng = np.random.default_rng(8)

    async def among_mates(client: httpx.AsyncClient, round_: int) -> httpx.Response:
        mates = [
            samples(
                int(rng.integers(1, 6)), seed=1000 * round_ + i, scale=float(10.0 ** (i % 7 - 3))
            )
            for i in range(24)
        ]
        posts = [client.post("/predict", json={"inputs": m.tolist()}) for m in mates]
        posts.insert(len(posts) // 2, client.post("/predict", json={"inputs": probe.tolist()}))
        answers = await asyncio.gather(*posts)
        return answers[len(posts) // 2]

    async def rounds(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return [await among_mates(client, r) for r in range(5)]

    with serve(create_app(settings(store, max_delay_ms=20.0, **split))) as base:
        alone = outputs(httpx.post(f"{base}/predict", json={"inputs": probe.tolist()}))
        batched = [outputs(r) for r in asyncio.run(rounds(base))]
        (model,) = httpx.get(f"{base}/models").json()["models"]
        batching = model["versions"][0]["batching"]
    assert batching["parallel_runs"] == split.get("parallel_runs", 1)
    for inside in batched:
        np.testing.assert_array_equal(inside, alone)


def test_torchscript_backend_end_to_end(store: Path) -> None:
    x = samples(4, seed=5)
    with serve(create_app(settings(store, backend="torchscript", allow_torchscript=True))) as base:
        response = httpx.post(f"{base}/predict", json={"inputs": x.tolist()})
        listed = httpx.get(f"{base}/models").json()
    np.testing.assert_allclose(outputs(response), reference(store, x), rtol=0, atol=1e-5)
    (version,) = listed["models"][0]["versions"]
    assert (version["status"], version["backend"], version["device"]) == (
        "ready",
        "torchscript",
        "cpu",
    )


def test_health_models_and_metrics(store: Path) -> None:
    with serve(create_app(settings(store))) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        ready = httpx.get(f"{base}/readyz")
        listed = httpx.get(f"{base}/models").json()
        httpx.post(f"{base}/predict", json={"inputs": samples(2, seed=1).tolist()})
        httpx.post(f"{base}/predict", json={"inputs": [[1, 2, 3]]})
        text = httpx.get(f"{base}/metrics").text
        requests = metric_samples(base, "foldserve_requests_total")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert listed["default_model"] == "tiny"
    (version,) = listed["models"][0]["versions"]
    assert version["status"] == "ready" and version["golden_max_abs_diff"] == 0.0
    for name in (
        "foldserve_requests_total",
        "foldserve_request_duration_seconds_bucket",
        "foldserve_batch_size_bucket",
        "foldserve_queue_depth",
        "foldserve_inference_duration_seconds_bucket",
        'foldserve_model_loaded{model="tiny",version="1"} 1.0',
    ):
        assert name in text
    assert requests["foldserve_requests_total{code=200,model=tiny,version=1}"] == 1
    assert requests["foldserve_requests_total{code=400,model=tiny,version=1}"] == 1


def test_models_show_the_batching_each_version_got(store: Path) -> None:
    config = settings(
        store, model_batching={"tiny": BatchingOverride(max_batch_size=5)}, inline_max_ms=0.0
    )
    with serve(create_app(config)) as base:
        (version,) = httpx.get(f"{base}/models/tiny").json()["versions"]
    batching = version["batching"]
    assert batching["max_batch_size"] == 5  # the per-model override, not the manifest's 64
    assert batching["inline"] is False  # inline_max_ms=0: never on the event loop
    assert batching["full_batch_ms"] > 0
