"""The server as it is run: several worker processes from the command line, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from service.app import create_app
from tests.service.conftest import ROOT, reference, running
from tests.service.test_app_e2e import metric_samples, outputs, samples, settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def shipped_reference(store: Path, x: np.ndarray) -> np.ndarray:
    path = store / "digits-mlp" / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    return np.asarray(out)


def worker_pid(base: str) -> int:
    """The pid of the worker answering a fresh connection."""
    with httpx.Client(base_url=base, timeout=5) as client:  # one client, one new connection
        pid: int = client.get("/healthz").json()["pid"]
        return pid


def test_two_workers_share_connections_survive_a_crash_and_drain_on_ctrl_c(
    shipped_store: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FOLDSERVE_")}
    env["FOLDSERVE_GRPC"] = "false"  # its own port: off, as in every test server
    command = [sys.executable, "-m", "service", "serve", "--workers", "2", "--port", str(port)]
    command += ["--model-store", str(shipped_store)]
    log = (tmp_path / "server.log").open("w+")
    # Its own process group, as a shell gives a foreground command: Ctrl-C signals the group.
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(0, 16, size=(int(rng.integers(1, 5)), 64)) for _ in range(24)]

    def ready_pids(wanted: int) -> set[int]:
        """Pids of workers answering ready, polled until ``wanted`` distinct ones have."""
        deadline, pids = time.monotonic() + 20, set()
        while len(pids) < wanted:
            assert server.poll() is None and time.monotonic() < deadline, f"only {pids} ready"
            with (
                contextlib.suppress(httpx.TransportError),
                httpx.Client(base_url=base, timeout=5) as client,  # one connection, one worker
            ):
                if client.get("/readyz").status_code == 200:
                    pids.add(client.get("/healthz").json()["pid"])
            time.sleep(0.02)
        return pids

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            posts = [client.post("/predict", json={"inputs": x.tolist()}) for x in inputs]
            return await asyncio.gather(*posts)

    try:
        first = ready_pids(2)
        # Every connection goes to some worker: 16 fresh ones all landing on one of the two
        # would happen once in 30,000 draws with the kernel's hash, every time with a bad split.
        assert len({worker_pid(base) for _ in range(16)}) == 2
        before = asyncio.run(send_all())
        crashed = min(first)
        os.kill(crashed, signal.SIGKILL)
        # The supervisor starts a new worker on the same socket, and it serves.
        after_crash = ready_pids(2)
        assert crashed not in after_crash and len(after_crash - first) == 1
        after = asyncio.run(send_all())
        # Any worker's /metrics tells about the whole server, the crashed worker's counts too.
        scrapes = [metric_samples(base, "foldserve_") for _ in range(4)]
        # Triton's statistics too, whichever worker answers (each call a fresh connection).
        triton = [httpx.get(f"{base}/v2/models/digits-mlp/stats").json() for _ in range(4)]
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: every worker must still drain
        code = server.wait(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.seek(0)
        output = log.read()
        log.close()
    assert code == 0, output
    for responses in (before, after):
        for x, response in zip(inputs, responses, strict=True):
            expected = shipped_reference(shipped_store, x.astype(np.float32))
            np.testing.assert_allclose(outputs(response), expected, rtol=0, atol=1e-5)
            assert response.json()["predictions"] == [str(i) for i in expected.argmax(axis=1)]
    for scraped in scrapes:
        key = "{code=200,model=digits-mlp,version=1}"
        assert scraped[f"foldserve_requests_total{key}"] == 2 * len(inputs)
        assert scraped["foldserve_model_loaded{model=digits-mlp,version=1}"] == 1
        assert scraped["foldserve_queue_depth{model=digits-mlp,version=1}"] == 0
        # Stage histograms pooled too: one queue wait and one encoding per answered request.
        for stage in ("queue", "compute_output"):
            labels = f"{{model=digits-mlp,stage={stage},version=1}}"
            assert scraped[f"foldserve_stage_duration_seconds_count{labels}"] == 2 * len(inputs)
    rows = sum(len(x) for x in inputs)
    for answer in triton:
        (stat,) = answer["model_stats"]
        assert stat["inference_count"] == 2 * rows  # both rounds, the crashed worker's too
        assert stat["inference_stats"]["success"]["count"] == 2 * len(inputs)
        assert stat["inference_stats"]["queue"]["count"] == 2 * len(inputs)
        assert stat["execution_count"] >= 1 and stat["last_inference"] > 0
    assert f"(pid {crashed}) exited with code -9" in output, output
    assert output.count("drained and stopped") == 2, output  # both drained, none killed
    assert "Traceback" not in output, output
    # The pooled-metrics folder (named after the supervisor) went with it.
    assert not list(Path(tempfile.gettempdir()).glob(f"foldserve-metrics-{server.pid}-*"))


def test_shutdown_answers_every_queued_request_through_http(store: Path) -> None:
    inputs = [samples(1, seed=500 + i) for i in range(12)]
    # A deadline far off and a cap never reached: every request waits in the queue.
    config = settings(store, max_delay_ms=2000.0, max_batch_size=64)

    async def main(base: str, stop: Callable[[], None]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            posts = [
                asyncio.ensure_future(client.post("/predict", json={"inputs": x.tolist()}))
                for x in inputs
            ]
            deadline = time.monotonic() + 5
            while metric_samples(base, "foldserve_queue_depth").get(
                "foldserve_queue_depth{model=tiny,version=1}"
            ) != len(inputs):
                assert time.monotonic() < deadline, "requests did not queue"
                await asyncio.sleep(0.02)
            stop()  # as on SIGTERM: stop accepting, finish what is in flight, then drain
            return await asyncio.gather(*posts)

    with running(create_app(config)) as (base, server):

        def stop() -> None:
            server.should_exit = True

        started = time.monotonic()
        responses = asyncio.run(main(base, stop))
        elapsed = time.monotonic() - started
    for x, response in zip(inputs, responses, strict=True):
        np.testing.assert_allclose(outputs(response), reference(store, x), rtol=0, atol=1e-5)
    assert elapsed < 5
