"""Graceful shutdown as an operator sees it: SIGTERM to the server's process group while 96
requests are in flight loses none, readiness turns 503 at once, new connections are refused, and
the process exits 0 -- with one process and with two workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.service.conftest import ROOT, SHAPE, Artifacts, add_version, reference

IN_FLIGHT = 96


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(
    store: Path, port: int, workers: int, log: Path, **settings: str
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FOLDSERVE_")}
    env["FOLDSERVE_GRPC"] = "false"  # its own port: off, as in every test server
    # Every request waits in the queue for 1.5 s: all 96 are surely in flight at the signal.
    env |= {
        "FOLDSERVE_MAX_DELAY_MS": "1500",
        "FOLDSERVE_MAX_BATCH_SIZE": "512",
        "FOLDSERVE_ADAPTIVE_DELAY": "false",
        "FOLDSERVE_DEFAULT_MODEL": "tiny",
        **{f"FOLDSERVE_{name.upper()}": value for name, value in settings.items()},
    }
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    command += ["--model-store", str(store), "--workers", str(workers)]
    # Its own process group, as a shell or a container runtime gives it.
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_ready(base: str, server: subprocess.Popen[bytes], workers: int) -> None:
    deadline, pids = time.monotonic() + 30, set()
    while len(pids) < workers:
        assert server.poll() is None and time.monotonic() < deadline, "server never got ready"
        with contextlib.suppress(httpx.TransportError), httpx.Client(base_url=base) as client:
            if client.get("/readyz").status_code == 200:
                pids.add(client.get("/healthz").json()["pid"])
        time.sleep(0.05)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body (what the server sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {k.lower(): v for k, v in headers.items()}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("workers", "rows", "queue"),
    [
        (1, 1, "4096"),
        (2, 1, "4096"),
        # 96 x 64 rows against a queue of 1,024: 80 wait at the admission gate, body unread,
        # when the signal comes (16 wait in the queue for their batch); they are let in and
        # answered in turn during the drain, not refused.
        (1, 64, "1024"),
    ],
)
def test_sigterm_with_96_requests_in_flight_loses_none_and_exits_0(
    store: Path, tmp_path: Path, workers: int, rows: int, queue: str
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    batching = {"max_delay_ms": "600", "max_batch_size": "4096"} if rows > 1 else {}
    server = _start(store, port, workers, log, max_queue_rows=queue, **batching)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(rows, *SHAPE)).astype(np.float32) for _ in range(IN_FLIGHT)]

    async def scenario() -> tuple[list[tuple[int, dict[str, str], bytes] | Exception], int, bool]:
        # Keep-alive connections, each used once already, as a client's pool holds them.
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(IN_FLIGHT)]
        for reader, writer in streams:
            writer.write(_request("GET", "/healthz"))
            assert (await _read_response(reader))[0] == 200
        # Every request fully sent on its connection before the signal.
        for (_, writer), x in zip(streams, inputs, strict=True):
            writer.write(_request("POST", "/predict", orjson.dumps({"inputs": x.tolist()})))
            await writer.drain()
        await asyncio.sleep(0.2)
        os.killpg(server.pid, signal.SIGTERM)
        await asyncio.sleep(0.05)
        try:  # a fresh connection: refused, or if not closed yet, told "not ready"
            async with httpx.AsyncClient(base_url=base, timeout=5) as probe:
                ready_status = (await probe.get("/readyz")).status_code
        except httpx.TransportError:
            ready_status = -1
        answers = await asyncio.gather(
            *(_read_response(reader) for reader, _ in streams), return_exceptions=True
        )
        for _, writer in streams:
            writer.close()
        await asyncio.sleep(0.5)
        try:
            async with httpx.AsyncClient(base_url=base, timeout=2) as late:
                await late.get("/healthz")
            refused = False
        except httpx.ConnectError:
            refused = True
        return list(answers), ready_status, refused

    try:
        _wait_ready(base, server, workers)
        answers, ready_status, refused = asyncio.run(scenario())
        code = server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    output = log.read_text()
    lost = [a for a in answers if isinstance(a, Exception) or a[0] != 200]
    assert not lost, f"{len(lost)} of {IN_FLIGHT} lost: {lost[:3]}\n{output}"
    for x, answer in zip(inputs, answers, strict=True):
        assert not isinstance(answer, Exception)
        _, headers, body = answer
        assert headers.get("connection") == "close"  # the server says it is going away
        np.testing.assert_allclose(
            orjson.loads(body)["outputs"], reference(store, x), rtol=0, atol=1e-5
        )
    assert ready_status in (503, -1)
    assert refused, "a new connection was accepted after the drain"
    assert code == 0, output
    assert "Traceback" not in output, output


def test_sigterm_while_models_load_exits_within_the_grace(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    """Stopped while 40 versions are still being verified: the process ends within
    shutdown_grace_s, exit 0, without waiting for the verifications in progress."""
    root = tmp_path / "store"
    for i in range(40):
        add_version(root, artifacts, name=f"m{i:02d}")
    add_version(root, artifacts)  # the default model, "tiny": loaded first
    port = _free_port()
    log = tmp_path / "server.log"
    # Bitwise invariance up to 512 rows, required: each version takes a while to verify.
    server = _start(root, port, 1, log, shutdown_grace_s="3", require_bitwise_invariance="true")
    try:
        _wait_ready(f"http://127.0.0.1:{port}", server, 1)  # the default model is ready
        models = httpx.get(f"http://127.0.0.1:{port}/models").json()["models"]
        assert any(v["status"] == "loading" for m in models for v in m["versions"])
        os.killpg(server.pid, signal.SIGTERM)
        started = time.monotonic()
        code = server.wait(timeout=20)
        took = time.monotonic() - started
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    output = log.read_text()
    assert code == 0, output
    assert took < 3 + 2, output
    assert "drained and stopped" in output, output
    assert "Traceback" not in output, output
