"""X-Request-ID on a real server: echoed when valid, created when absent or invalid, and on every
response (raw inference routes, their errors, FastAPI routes, probes)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from service.app import create_app
from service.http.context import RequestIds
from service.settings import Settings
from tests.service.conftest import SHAPE, Artifacts, add_version, serve

CREATED = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")
SAMPLE = np.zeros((1, *SHAPE)).tolist()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, artifacts: Artifacts) -> Path:
    root = tmp_path_factory.mktemp("store")
    add_version(root, artifacts)
    return root


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[httpx.Client]:
    settings = Settings(model_store=store, default_model="tiny", max_body_bytes=4096)
    with serve(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


def predict(client: httpx.Client, **headers: str) -> httpx.Response:
    return client.post("/predict", json={"inputs": SAMPLE}, headers=headers)


def test_a_valid_client_id_is_echoed(client: httpx.Client) -> None:
    for sent in ("abc-123", "0af7651916cd43dd8448eb211c80319c", "Root=1-5e1b;Parent=53", "x" * 128):
        response = predict(client, **{"X-Request-ID": sent})
        assert response.status_code == 200
        assert response.headers["x-request-id"] == sent


def test_an_id_is_created_when_absent_and_each_is_new(client: httpx.Client) -> None:
    ids = [predict(client).headers["x-request-id"] for _ in range(3)]
    assert all(CREATED.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    "sent",
    [
        b"x" * 129,  # too long
        b"has space",
        b"caf\xc3\xa9",  # not ASCII
        b"\xff\xfe",
        b"",
    ],
)
def test_an_invalid_id_is_replaced_never_reflected(client: httpx.Client, sent: bytes) -> None:
    response = client.post(
        "/predict", content=orjson.dumps({"inputs": SAMPLE}), headers={"X-Request-ID": sent}
    )
    assert response.status_code == 200
    assert CREATED.fullmatch(response.headers["x-request-id"])
    assert response.headers.get_list("x-request-id") == [response.headers["x-request-id"]]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("POST", "/predict", b"{not json", {"Content-Type": "application/json"}, 400),
        ("POST", "/predict", b'{"inputs": [1]}', {"Content-Type": "text/plain"}, 415),
        ("POST", "/predict", b"[" + b"0," * 3000 + b"0]", {}, 413),
        ("GET", "/predict", b"", {}, 405),
        ("POST", "/models/nope/predict", orjson.dumps({"inputs": SAMPLE}), {}, 404),
        ("POST", "/v2/models/nope/infer", b"{}", {}, 404),
        ("POST", "/v2/models/tiny/infer", b'{"inputs": []}', {}, 400),
        # A budget no batch can meet: shed before the body is read.
        ("POST", "/predict", orjson.dumps({"inputs": SAMPLE}), {"X-Request-Timeout": "1e-9"}, 503),
        ("GET", "/healthz", b"", {}, 200),
        ("GET", "/readyz", b"", {}, 200),
        ("GET", "/v2/health/ready", b"", {}, 200),
        ("GET", "/models", b"", {}, 200),
        ("GET", "/metrics", b"", {}, 200),
        ("GET", "/v2/models/tiny", b"", {}, 200),
        ("GET", "/no/such/route", b"", {}, 404),
        ("POST", "/models/tiny/versions/x/predict", orjson.dumps({"inputs": SAMPLE}), {}, 400),
    ],
)
def test_every_response_carries_the_id(
    client: httpx.Client,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    response = client.request(
        method, path, content=body or None, headers={**headers, "X-Request-ID": "trace-7"}
    )
    assert response.status_code == status, response.text
    assert response.headers.get_list("x-request-id") == ["trace-7"]
    created = client.request(method, path, content=body or None, headers=headers)
    assert CREATED.fullmatch(created.headers["x-request-id"])


def test_a_server_with_keys_gives_the_id_with_its_401(store: Path) -> None:
    settings = Settings(model_store=store, default_model="tiny", api_key="k-1")
    with serve(create_app(settings), wait_loaded=False) as base:
        for path in ("/predict", "/models"):
            method = "POST" if path == "/predict" else "GET"
            response = httpx.request(method, base + path, headers={"X-Request-ID": "r-401"})
            assert response.status_code == 401
            assert response.headers["x-request-id"] == "r-401"


def test_ids_differ_between_processes_and_count_up() -> None:
    first, second = RequestIds(), RequestIds()
    a, b = first.new(), first.new()
    assert a.split(b"-")[0] == b.split(b"-")[0] and a != b
    assert first.new().split(b"-")[0] != second.new().split(b"-")[0]
