"""The connection layer as an attacker meets it, on raw sockets: headers past their bounds get 431
without growing the server, a malformed request never costs the valid ones before it their
answer, every answer (the parser's and the limits' too) is the project's error body with an
X-Request-ID, bodies are refused from their headers before they are read, and management names
a client chose never cause a 500."""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from service.app import create_app
from service.http.connection import UNREAD_BODY_PAUSE_S
from service.settings import Settings
from tests.service.conftest import running

ONE = orjson.dumps({"inputs": [[0.5] * 16]})


@pytest.fixture
def server(store: Path) -> Iterator[tuple[str, int]]:
    settings = Settings(
        model_store=store, default_model="tiny", management_api=True, max_json_bytes=1 << 20
    )
    with running(create_app(settings)) as (base, _):
        yield base, int(base.rsplit(":", 1)[1])


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: t", "Content-Type: application/json", *extra]
    return ("\r\n".join([*head, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode() + body


def answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every HTTP/1.1 answer in ``data`` (each with a Content-Length)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        found.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return found


def exchange(port: int, data: bytes, limit_s: float = 10) -> bytes:
    """Send ``data`` at once, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(data)
        conn.settimeout(limit_s)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def is_error_body(answer: tuple[int, dict[str, str], bytes]) -> str:
    _, headers, body = answer
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"]
    message = orjson.loads(body)["error"]
    assert isinstance(message, str) and message
    return str(message)


def test_a_valid_request_is_answered_whatever_follows_it(server: tuple[str, int]) -> None:
    _, port = server
    data = post("/predict", ONE) + post("/predict", ONE) + b"GARBAGE / HTTP/9.9\r\n\r\n"
    first, second, refused = answers(exchange(port, data))
    assert first[0] == second[0] == 200
    assert orjson.loads(first[2])["predictions"] == orjson.loads(second[2])["predictions"]
    assert refused[0] == 400 and refused[1]["connection"] == "close"
    assert "malformed HTTP request" in is_error_body(refused)


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["X-Big: " + "a" * 70_000], "one header of 70 kB"),
        ([f"X-H{i}: v" for i in range(101)], "101 headers"),
    ],
)
def test_headers_past_their_bounds_get_431(
    server: tuple[str, int], extra: list[str], why: str
) -> None:
    base, port = server
    (refused,) = answers(exchange(port, post("/predict", ONE, *extra)))
    assert refused[0] == 431, why
    message = is_error_body(refused)
    assert "max_header_bytes (FOLDSERVE_MAX_HEADER_BYTES=65536)" in message
    assert "max_headers (FOLDSERVE_MAX_HEADERS=100)" in message
    assert httpx.post(f"{base}/predict", content=ONE).status_code == 200


def test_a_header_that_never_ends_is_cut_off_without_being_read(server: tuple[str, int]) -> None:
    _, port = server
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        chunk = b"a" * 65536
        try:
            while sent < 100 << 20:  # a 100 MiB header, if the server read it all
                conn.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        conn.settimeout(5)
        data = b""
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass  # the answer may be lost to a reset: the client kept sending after it
    # Refused after the limit and a read or two, and the kernel's buffers on both sides.
    assert sent < 16 << 20
    assert data == b"" or data.startswith(b"HTTP/1.1 431"), data[:100]


def test_the_parsers_own_errors_are_the_projects_error_body(server: tuple[str, int]) -> None:
    _, port = server
    for data in (b"\x00\x01\x02 nonsense\r\n\r\n", b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n"):
        (refused,) = answers(exchange(port, data))
        assert refused[0] == 400
        assert "malformed HTTP request" in is_error_body(refused)


def test_a_body_too_large_by_its_length_is_refused_unread(server: tuple[str, int]) -> None:
    base, port = server
    with socket.create_connection(("127.0.0.1", port)) as conn:
        # Claims 60 MB and sends none of it: the answer cannot depend on reading the body.
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 60000000\r\n\r\n"
        )
        conn.settimeout(5)
        started = time.monotonic()
        data = conn.recv(65536)
        waited = time.monotonic() - started
    # After a pause (UNREAD_BODY_PAUSE_S), which costs the server nothing and a client
    # sending such bodies in a loop most of its turns.
    assert UNREAD_BODY_PAUSE_S * 0.8 <= waited < 2
    (refused,) = answers(data)
    assert refused[0] == 413
    assert "60.0 MB exceeds max_json_bytes (FOLDSERVE_MAX_JSON_BYTES=1048576)" in is_error_body(
        refused
    )
    assert refused[1]["connection"] == "close"
    assert httpx.get(f"{base}/healthz").status_code == 200


def test_a_gzip_body_is_refused_as_it_inflates_past_the_json_bound(
    server: tuple[str, int],
) -> None:
    base, _ = server
    inflated = b'{"inputs": [' + b",".join([b"[" + b",".join([b"0"] * 16) + b"]"] * 60_000) + b"]}"
    packed = gzip.compress(inflated)
    assert len(inflated) > 1 << 20 > len(packed) * 10
    answer = httpx.post(
        f"{base}/predict", content=packed, headers={"Content-Encoding": "gzip"}, timeout=10
    )
    assert answer.status_code == 413
    assert "once decoded (gzip" in answer.json()["error"]


def test_json_holding_too_many_numbers_is_refused_before_it_is_parsed(store: Path) -> None:
    settings = Settings(model_store=store, default_model="tiny", max_json_items=1000)
    many = orjson.dumps({"inputs": [[0.0] * 16] * 100})  # 1,600 numbers, 101 lists
    with running(create_app(settings)) as (base, _):
        refused = httpx.post(f"{base}/predict", content=many)
        fits = httpx.post(f"{base}/predict", content=orjson.dumps({"inputs": [[0.0] * 16] * 50}))
    assert refused.status_code == 413
    assert "more than max_json_items (FOLDSERVE_MAX_JSON_ITEMS=1000)" in refused.json()["error"]
    assert fits.status_code == 200


def test_expect_100_continue_is_answered_before_the_body(server: tuple[str, int]) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n"
            + f"Content-Length: {len(ONE)}\r\n\r\n".encode()
        )
        conn.settimeout(5)
        assert conn.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.sendall(ONE)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    ((status, _, _),) = answers(data)
    assert status == 200


def test_an_answer_before_the_body_keeps_the_connection_only_for_a_small_rest(
    store: Path,
) -> None:
    settings = Settings(model_store=store, default_model="tiny", api_key="secret")
    with running(create_app(settings), key="secret") as (base, _):
        port = int(base.rsplit(":", 1)[1])
        # Refused for its key before its body is read: the small rest is read and dropped,
        # and the next request on the connection is served.
        data = post("/predict", ONE) + post("/predict", ONE, "X-API-Key: secret")
        unauthorized, served = answers(exchange(port, data + b"GET /x HTTP/1.1\r\n\r\n"))[:2]
    assert unauthorized[0] == 401 and served[0] == 200


def test_head_answers_carry_no_body(server: tuple[str, int]) -> None:
    _, port = server
    data = exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 ") and rest == b""


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("..", 404),  # the client resolves the dot segment: another path, not found
        ("DIGITS-MLP", 400),
        ("a%00", 400),
        ("--help", 400),
        ("a" * 60_000, 400),
        ("not-there", 404),
    ],
)
def test_management_names_are_client_errors_cut_short(
    server: tuple[str, int], name: str, status: int
) -> None:
    base, _ = server
    for action in ("load", "unload"):
        answer = httpx.post(f"{base}/v2/repository/models/{name}/{action}", timeout=10)
        assert answer.status_code == status, (action, answer.text[:200])
        assert len(answer.text) < 600  # a 60,000-character name is not echoed whole
    assert httpx.get(f"{base}/readyz").status_code == 200
