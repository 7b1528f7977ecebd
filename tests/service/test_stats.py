"""Triton's statistics extension: counted by the batcher (runs, waits) and the dataplane
(requests), answered at /v2/models/stats and per model and version in Triton's format."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.batching import Batcher
from service.settings import Settings
from service.telemetry import LAYOUT, Telemetry
from tests.service.conftest import SHAPE, Artifacts, add_version, serve
from tests.service.test_batching import Recorder, rows

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def test_the_batcher_counts_runs_waits_and_the_requests_each_run_computed() -> None:
    telemetry = Telemetry()
    stats = telemetry.version("m", 1)

    async def main() -> None:
        run = Recorder(hold=True)
        batcher = Batcher(run, max_batch_size=4, max_delay_ms=60_000, stats=stats)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(4)))  # a full batch: runs at once
        while not run.entered.is_set():
            await asyncio.sleep(0.001)
        # While the first run is held: one request of 6 rows is split across two batches,
        # the second shared with a 2-row request.
        queued = [asyncio.ensure_future(batcher.submit(rows(n))) for n in (6, 2)]
        await asyncio.sleep(0.05)
        run.release.set()
        await asyncio.gather(first, *queued)
        await batcher.stop()
        assert run.sizes == [4, 4, 4]

    asyncio.run(main())
    figures = telemetry.read()[("m", "1")]
    queue, infer = LAYOUT.stages["queue"], LAYOUT.stages["compute_infer"]
    assert figures.get(LAYOUT.counts["execution_count"]) == 3
    assert figures.count(infer) == 1 + 1 + 2  # the split request counts in both runs
    assert figures.count(queue) == 3  # each request's wait once, up to its first run
    assert figures.get(queue.sum_slot) >= 0.05  # the two queued ones waited for the held run
    last = figures.get(LAYOUT.counts["last_inference_ms"])
    assert last == pytest.approx(time.time() * 1000, abs=5000)
    assert figures.count(LAYOUT.batch_rows) == 3 and figures.get(LAYOUT.batch_rows.sum_slot) == 12


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, artifacts: Artifacts) -> Iterator[str]:
    root = tmp_path_factory.mktemp("stats") / "store"
    add_version(root, artifacts)
    add_version(root, artifacts, name="other")
    settings = Settings(model_store=root, default_model="tiny", management_api=True)
    with serve(create_app(settings)) as url:
        yield url


def x(n: int) -> list[Any]:
    return np.random.default_rng(n).normal(size=(n, *SHAPE)).tolist()


def test_statistics_count_what_was_served_in_tritons_format(base: str) -> None:
    started_ms = time.time() * 1000
    with httpx.Client(base_url=base) as client:
        for n in (1, 2, 3):
            assert client.post("/predict", json={"inputs": x(n)}).status_code == 200
        tensor = {"name": "x", "shape": [4, *SHAPE], "datatype": "FP32", "data": x(4)}
        assert client.post("/v2/models/tiny/infer", json={"inputs": [tensor]}).status_code == 200
        assert client.post("/predict", json={"inputs": [[1.0]]}).status_code == 400  # fails
        assert client.post("/models/nope/predict", json={"inputs": x(1)}).status_code == 404
        everything = client.get("/v2/models/stats").json()
        model = client.get("/v2/models/tiny/stats").json()
        version = client.get("/v2/models/tiny/versions/1/stats").json()
        missing = [
            client.get(path)
            for path in ("/v2/models/nope/stats", "/v2/models/tiny/versions/2/stats")
        ]
        extensions = client.get("/v2").json()["extensions"]
    names = [(s["name"], s["version"]) for s in everything["model_stats"]]
    assert names == [("other", "1"), ("tiny", "1")]
    (tiny,) = [s for s in everything["model_stats"] if s["name"] == "tiny"]
    assert model == version == {"model_stats": [tiny]}
    assert set(tiny) == {
        "name",
        "version",
        "last_inference",
        "inference_count",
        "execution_count",
        "inference_stats",
        "batch_stats",
    }
    assert tiny["inference_count"] == 1 + 2 + 3 + 4  # rows answered
    assert 1 <= tiny["execution_count"] <= 4
    assert started_ms - 1000 <= tiny["last_inference"] <= time.time() * 1000 + 1000
    stats = tiny["inference_stats"]
    assert set(DURATIONS) <= set(stats)
    assert stats["success"]["count"] == 4 and stats["fail"]["count"] == 1
    assert stats["queue"]["count"] == 4 and stats["compute_infer"]["count"] >= 4
    for name in DURATIONS:
        assert stats[name]["ns"] > 0, name
    # Each request's whole time includes its parts.
    parts = sum(stats[p]["ns"] for p in ("compute_input", "compute_output"))
    assert stats["success"]["ns"] > parts
    (other,) = [s for s in everything["model_stats"] if s["name"] == "other"]
    assert other["inference_count"] == other["execution_count"] == 0
    assert other["last_inference"] == 0
    for answer in missing:
        assert answer.status_code == 404 and list(answer.json()) == ["error"]
    assert extensions == [
        "binary_tensor_data",
        "model_configuration",
        "statistics",
        "model_repository",
    ]


def test_metrics_expose_the_stage_histograms_behind_tritons_figures(base: str) -> None:
    with httpx.Client(base_url=base) as client:
        for n in (1, 5):
            assert client.post("/predict", json={"inputs": x(n)}).status_code == 200
        triton = client.get("/v2/models/tiny/stats").json()["model_stats"][0]["inference_stats"]
        exposition = client.get("/metrics").text
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    buckets: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != "foldserve_stage_duration_seconds":
            continue
        for sample in family.samples:
            if sample.labels["model"] != "tiny":
                continue
            stage = sample.labels["stage"]
            if sample.name.endswith("_count"):
                counts[stage] = sample.value
            elif sample.name.endswith("_sum"):
                sums[stage] = sample.value
            else:
                buckets.setdefault(stage, []).append(sample.value)
    assert set(counts) == {"queue", "compute_input", "compute_infer", "compute_output"}
    for stage, count in counts.items():
        assert count == triton[stage]["count"] > 0, stage
        assert sums[stage] == pytest.approx(triton[stage]["ns"] / 1e9, abs=1e-6), stage
        assert buckets[stage] == sorted(buckets[stage]) and buckets[stage][-1] == count


def test_load_refuses_what_it_cannot_honour(base: str) -> None:
    """Triton's load may carry a configuration or model files: refused, not silently ignored."""
    url = f"{base}/v2/repository/models/tiny/load"
    assert httpx.post(url, json={"parameters": {"config": "{}"}}).status_code == 400
    assert httpx.post(url, json={"parameters": {"file:1/model.onnx": "AAAA"}}).status_code == 400
    assert httpx.post(url, content=b"x" * 70_000).status_code == 400
    assert httpx.post(url, json={}).status_code == 200
    assert httpx.post(url).status_code == 200
