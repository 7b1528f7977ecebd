"""The admission gate: while the queue is full, requests wait in line with their body unread
(nothing accepted is lost, nothing is parsed only to be refused); a waiter that cannot be
answered in time is refused before its body is read."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.admission import Gate
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import SHAPE, reference, running

# ------------------------------------------------------------------ the gate alone


def test_the_capacity_follows_the_rows_requests_bring() -> None:
    gate = Gate(max_rows=64)
    assert gate.capacity == 64  # one-row requests until told otherwise
    for _ in range(40):
        gate.note_rows(16)
    assert gate.capacity == 4  # 64 rows hold four 16-row requests


def test_waiters_pass_in_order_as_places_free_and_a_timeout_keeps_no_place() -> None:
    async def main() -> None:
        gate = Gate(max_rows=2)
        assert gate.enter_now() and gate.enter_now()
        assert not gate.enter_now()  # full
        order: list[str] = []

        async def waiter(name: str, timeout_s: float | None) -> None:
            if await gate.wait(timeout_s):
                order.append(name)

        tasks = [asyncio.ensure_future(waiter(n, None)) for n in ("a", "b")]
        late = asyncio.ensure_future(waiter("late", 0.05))
        await asyncio.sleep(0.1)  # "late" gives up meanwhile
        assert gate.waiting == 2 and late.done() and order == []
        gate.leave()
        await asyncio.sleep(0.01)
        assert order == ["a"] and gate.inside == 2
        gate.leave()
        await asyncio.gather(*tasks)
        assert order == ["a", "b"] and gate.inside == 2 and gate.waiting == 0

    asyncio.run(main())


def test_a_waiter_cancelled_as_it_is_let_in_gives_its_place_back() -> None:
    async def main() -> None:
        gate = Gate(max_rows=1)
        assert gate.enter_now()
        waiting = asyncio.ensure_future(gate.wait(None))
        await asyncio.sleep(0)
        gate.leave()  # hands the place to the waiter...
        waiting.cancel()  # ...whose client goes away before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert gate.inside == 0 and gate.is_open()

    asyncio.run(main())


def test_the_expected_wait_follows_the_rate_of_answers_while_requests_wait() -> None:
    async def main() -> tuple[float, float]:
        gate = Gate(max_rows=2)
        assert gate.enter_now() and gate.enter_now()
        before = gate.expected_wait()  # never full before: nothing measured
        waiters = [asyncio.ensure_future(gate.wait(None)) for _ in range(6)]
        await asyncio.sleep(0)
        for _ in range(4):  # one answer every 20 ms while the others wait
            await asyncio.sleep(0.02)
            gate.leave()
        await asyncio.sleep(0)
        after = gate.expected_wait()  # 2 waiting + 1 more + 2 inside, 20 ms apart
        for task in waiters:
            task.cancel()
        return before, after

    before, after = asyncio.run(main())
    assert before == 0.0
    assert 5 * 0.02 <= after < 5 * 0.02 * 2


# ------------------------------------------------------------------ through real HTTP


def _post_head(conn: socket.socket, body_length: int, timeout_s: float) -> None:
    conn.sendall(
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {body_length}\r\nX-Request-Timeout: {timeout_s}\r\n\r\n".encode()
    )


def _answer(conn: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(v for k, v in _headers(head) if k == "content-length"))
    while len(body) < length:
        body += conn.recv(65536)
    return int(head.split()[1]), orjson.loads(body)


def _headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode().split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines)]


def test_a_full_queue_holds_requests_unread_then_answers_them(store: Path) -> None:
    settings = Settings(model_store=store, default_model="tiny", max_queue_rows=8, inline_max_ms=0)
    app = create_app(settings)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, *SHAPE)).astype(np.float32)  # a request fills the whole queue
    with running(app) as (base, _):
        with httpx.Client(base_url=base) as client:
            for _ in range(20):  # the gate learns that requests bring 8 rows: one at a time
                assert client.post("/predict", json={"inputs": x.tolist()}).status_code == 200
        ready = app.state.model_registry.resolve("tiny", None)
        batcher, gate = ready.batcher, ready.admission.gate
        assert gate.capacity == 1
        release = threading.Event()
        run = batcher._run
        batcher._run = lambda batch: (release.wait(10), run(batch))[1]

        holder = threading.Thread(
            target=lambda: results.append(
                httpx.post(f"{base}/predict", json={"inputs": x.tolist()})
            )
        )
        results: list[httpx.Response] = []
        holder.start()
        while gate.inside == 0:
            threading.Event().wait(0.01)
        body = orjson.dumps({"inputs": x.tolist()})
        host, port = base.removeprefix("http://").split(":")
        waiting = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
        try:
            # The running batch and one more request fill the queue: without the gate, the
            # third would be read, parsed and refused (503 "queue full").
            for conn in waiting:
                _post_head(conn, len(body), timeout_s=20)
                conn.sendall(body)
                conn.settimeout(0.3)
            for conn in waiting:
                with pytest.raises(TimeoutError):  # held: neither refused nor answered
                    conn.recv(1)
            assert gate.waiting == 2 and batcher.queue_rows == 0  # unread, not queued
            # Meanwhile a request that could not be answered in time is refused at once,
            # before its body (never sent) is read.
            batcher._batch_s = 5.0
            with socket.create_connection((host, int(port)), timeout=5) as hopeless:
                _post_head(hopeless, len(body), timeout_s=0.5)
                status, answer = _answer(hopeless)
            assert status == 503 and "deadline" in answer["error"]
            release.set()
            holder.join(10)
            assert results[0].status_code == 200
            for conn in waiting:
                conn.settimeout(5)
                status, answer = _answer(conn)  # let in, in turn, as the ones ahead finish
                assert status == 200, answer
                np.testing.assert_allclose(answer["outputs"], reference(store, x), atol=1e-5)
        finally:
            for conn in waiting:
                conn.close()
        assert gate.inside == 0 and gate.waiting == 0
