"""Admission by time: what cannot be answered before its deadline is refused at once, before its
body is read where the decision needs no body; what can is answered; the log stays quiet."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import dataplane
from service.app import create_app
from service.batching import Batcher
from service.errors import InferenceTimeout, InvalidInput
from service.repeated_log import RepeatedLog
from service.settings import Settings
from service.shedding import requested_timeout, timeout_parameter
from tests.service.conftest import SHAPE, running

# ------------------------------------------------------------------ the batcher's side


def _rows(n: int) -> np.ndarray:
    return np.ones((n, 3), dtype=np.float32)


def test_the_estimated_wait_counts_the_batches_ahead_at_the_measured_batch_time() -> None:
    gate = threading.Event()

    def slow(batch: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return batch * 2

    async def main() -> None:
        batcher = Batcher(slow, max_batch_size=4, max_delay_ms=0, initial_batch_s=0.5)
        assert batcher.estimated_wait(1) == pytest.approx(0.5)  # its own batch
        assert batcher.estimated_wait(9) == pytest.approx(1.5)  # 9 rows: 3 batches of 4
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(_rows(4)))
        await asyncio.sleep(0.05)  # the first batch is running, blocked on the gate
        queued = asyncio.ensure_future(batcher.submit(_rows(6)))
        await asyncio.sleep(0.01)
        # 6 queued + 1 new row = 2 batches, plus half of the running one.
        assert batcher.estimated_wait(1) == pytest.approx(2.5 * 0.5)
        gate.set()
        await asyncio.gather(first, queued)
        # Measured batches (fast once the gate is open) pull the average down from 0.5 s.
        assert batcher.batch_seconds < 0.5
        await batcher.stop()

    asyncio.run(main())


def test_the_batch_time_is_the_backends_own_not_the_loops_delay_in_resuming() -> None:
    def backend(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        return batch * 2

    async def main() -> float:
        batcher = Batcher(backend, max_batch_size=4, max_delay_ms=0)
        await batcher.start()
        answer = asyncio.ensure_future(batcher.submit(_rows(1)))
        await asyncio.sleep(0.005)  # the batch is running in its thread...
        time.sleep(0.3)  # ...while the event loop is busy elsewhere (as under overload)
        await answer
        await batcher.stop()
        return batcher.batch_seconds

    # Measured around the await, the batch would count the loop's 0.3 s: every estimate built
    # on it would refuse requests that could be answered.
    assert 0.02 <= asyncio.run(main()) < 0.15


def test_a_request_past_its_own_deadline_times_out_and_is_never_computed() -> None:
    computed: list[int] = []
    gate = threading.Event()

    def slow(batch: np.ndarray) -> np.ndarray:
        gate.wait(5)
        computed.append(len(batch))
        return batch

    async def main() -> None:
        batcher = Batcher(slow, max_batch_size=2, max_delay_ms=0)
        await batcher.start()
        loop = asyncio.get_running_loop()
        blocking = asyncio.ensure_future(batcher.submit(_rows(2)))
        await asyncio.sleep(0.05)
        with pytest.raises(InferenceTimeout, match="own deadline"):
            await batcher.submit(_rows(1), deadline=loop.time() + 0.05)
        gate.set()
        await blocking
        await batcher.stop()

    asyncio.run(main())
    assert computed == [2]  # the expired request's row never reached the model


def test_timeouts_are_parsed_strictly() -> None:
    assert requested_timeout(None) is None
    assert requested_timeout(b"0.25") == 0.25
    for bad in (b"0", b"-1", b"soon", b"nan", b"inf", b"1" * 5000):
        with pytest.raises(InvalidInput, match="X-Request-Timeout"):
            requested_timeout(bad)
    assert timeout_parameter({"timeout": 250_000}) == 0.25
    assert timeout_parameter({}) is None and timeout_parameter(None) is None
    for bad_value in (0, -5, 1.5, True, "100"):
        with pytest.raises(InvalidInput, match="microseconds"):
            timeout_parameter({"timeout": bad_value})


# ------------------------------------------------------------------ through real HTTP


def _slow_estimate(app: Any, seconds: float) -> None:
    """Make the tiny model's batcher believe each batch takes ``seconds`` (no real slowness)."""
    entry = app.state.model_registry.resolve("tiny", None)
    entry.batcher._batch_s = seconds


def _headers_only(base: str, path: str, timeout_s: float, body_length: int) -> bytes:
    """Send a POST's headers, never its body, and return whatever the server answers."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_length}\r\nX-Request-Timeout: {timeout_s}\r\n\r\n".encode()
        )
        return conn.recv(65536)


def _metric(base: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _settings(store: Path) -> Settings:
    return Settings(model_store=store, default_model="tiny", adaptive_delay=True)


@pytest.mark.parametrize("path", ["/predict", "/models/tiny/predict", "/v2/models/tiny/infer"])
def test_a_request_that_cannot_meet_its_deadline_is_refused_before_its_body_is_read(
    store: Path, path: str
) -> None:
    app = create_app(_settings(store))
    with running(app) as (base, _):
        _slow_estimate(app, 5.0)
        # The body never comes: an answer proves the server decided without reading it.
        answer = _headers_only(base, path, timeout_s=0.5, body_length=10_000)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"retry-after: 5" in answer.lower()
        assert b"after the request's deadline" in answer
        assert _metric(base, "foldserve_requests_shed_total", reason="deadline") == 1


def test_a_request_that_can_meet_its_deadline_is_answered(store: Path) -> None:
    app = create_app(_settings(store))
    x = np.random.default_rng(0).normal(size=(2, *SHAPE)).astype(np.float32)
    with running(app) as (base, _):
        _slow_estimate(app, 0.2)
        ok = httpx.post(
            f"{base}/predict", json={"inputs": x.tolist()}, headers={"X-Request-Timeout": "5"}
        )
        assert ok.status_code == 200, ok.text
        # V2's own timeout parameter (microseconds) is checked once the body is read.
        _slow_estimate(app, 5.0)
        v2 = httpx.post(
            f"{base}/v2/models/tiny/infer",
            json={
                "inputs": [
                    {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
                ],
                "parameters": {"timeout": 100_000},
            },
        )
        assert v2.status_code == 503 and "deadline" in v2.json()["error"]
        bad = httpx.post(
            f"{base}/predict", json={"inputs": x.tolist()}, headers={"X-Request-Timeout": "x"}
        )
        assert bad.status_code == 400
        assert _metric(base, "foldserve_estimated_wait_seconds", model="tiny") > 0


def test_the_shed_log_is_one_line_then_a_summary(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(_settings(store))
    app.state.dataplane.shed_log = RepeatedLog(dataplane.log, "shedding load", interval_s=0.3)
    caplog.set_level(logging.WARNING)
    with running(app) as (base, _):
        _slow_estimate(app, 5.0)
        with httpx.Client(base_url=base, headers={"X-Request-Timeout": "0.5"}) as client:
            codes = [client.post("/predict", json={"inputs": [[0.0] * 16]}).status_code]
            codes += [
                client.post("/predict", json={"inputs": [[0.0] * 16]}).status_code
                for _ in range(39)
            ]
        assert codes == [503] * 40
        time.sleep(1.0)  # the summaries fire on the server's loop, every 0.3 s while it sheds
    messages = [r.getMessage() for r in caplog.records]
    firsts = [m for m in messages if m.startswith("shedding load: ") and "more in the" not in m]
    assert len(firsts) == 1
    summaries = [
        re.match(r"shedding load: (\d+) more in the last 0.3 s: tiny \(deadline\) \1$", m)
        for m in messages
        if m.startswith("shedding load: ") and "more in the last" in m
    ]
    assert summaries and all(summaries)
    assert sum(int(m.group(1)) for m in summaries if m) == 39  # every refusal after the first
    assert not [m for m in messages if "Overloaded" in m]
