"""Slow and broken clients are cut off: headers and bodies that trickle or stall get 408, idle
connections close, and past the connection cap new requests get 503, while others are served."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from service.app import create_app
from service.server import run_in_thread
from service.settings import Settings
from tests.service.conftest import running


@contextlib.contextmanager
def served(store: Path, **overrides: Any) -> Iterator[tuple[str, int]]:
    """The app on the production server with these settings, on a loopback port."""
    settings = Settings(model_store=store, default_model="tiny", **overrides)
    with running(create_app(settings)) as (base, _):
        yield base, int(base.rsplit(":", 1)[1])


def _read_until_closed(conn: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    started, data = time.monotonic(), b""
    conn.settimeout(limit_s)
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


FAST = {"header_timeout_s": 0.5, "body_timeout_s": 0.5, "keep_alive_timeout_s": 0.5}


def test_trickled_headers_get_408_and_the_connection_closes(store: Path) -> None:
    with served(store, **FAST) as (base, port):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        answer, after = _read_until_closed(conn, limit_s=5)
        conn.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"headers not received within 0.5 s" in answer
        assert b"x-request-id: " in answer and b"application/json" in answer
        assert 0.4 < after < 3
        assert httpx.get(f"{base}/healthz").status_code == 200  # the server is fine


def test_a_body_shorter_than_its_length_gets_408_not_a_hang(store: Path) -> None:
    with served(store, **FAST) as (base, port):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"inputs": [[1'
        )
        answer, after = _read_until_closed(conn, limit_s=5)
        conn.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"body not received within 0.5 s" in answer
        assert b"x-request-id: " in answer
        assert 0.4 < after < 3
        ok = httpx.post(f"{base}/predict", json={"inputs": [[0.0] * 16]})
        assert ok.status_code == 200, ok.text


def test_a_connection_that_sends_nothing_is_closed(store: Path) -> None:
    with served(store, **FAST) as (_, port):
        conn = socket.create_connection(("127.0.0.1", port))
        answer, after = _read_until_closed(conn, limit_s=5)
        conn.close()
        assert answer == b"" and after < 3


def test_past_the_connection_cap_requests_get_503_and_probes_an_answer(store: Path) -> None:
    with served(store, max_connections=4) as (base, port):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            time.sleep(0.2)  # accepted by the server
            refused = httpx.post(f"{base}/predict", json={"inputs": [[0.0] * 16]})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["x-request-id"]
            assert "max_connections (FOLDSERVE_MAX_CONNECTIONS=4)" in refused.json()["error"]
            # A liveness or readiness probe is answered: a busy server is not a dead one.
            for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
                assert httpx.get(f"{base}{probe}").status_code == 200, probe
        finally:
            for conn in held:
                conn.close()
        time.sleep(0.2)
        ok = httpx.post(f"{base}/predict", json={"inputs": [[0.0] * 16]})
        assert ok.status_code == 200


def test_a_server_loading_before_serving_never_answers_loading(store: Path) -> None:
    # (Without the setting this very connection is answered 503 "loading".)
    settings = Settings(model_store=store, default_model="tiny", load_before_serving=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    # A connection made before the server runs waits in the socket's queue, as a replacement
    # worker's queued connections do, and is answered once the models are verified.
    early = socket.create_connection(("127.0.0.1", port))
    early.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    app = create_app(settings)
    server, thread = run_in_thread(app, settings, sock)
    try:
        answer, _ = _read_until_closed(early, limit_s=20)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b'"ready":true' in answer
    finally:
        early.close()
        server.request_stop()
        thread.join(timeout=20)
        sock.close()
