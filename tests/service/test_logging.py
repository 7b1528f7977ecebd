"""Structured logs on a real server: one JSON access line per request with the request id, model,
version, rows, status and latency; sampling; the id on error lines; never a body or a key; and
``log_format=json`` making every line of a ``foldserve serve`` process JSON, the server's too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.app import AccessLog, create_app
from service.http.context import ACCESS_LOGGER
from service.logs import JsonFormatter, TextFormatter
from service.settings import Settings
from tests.service.conftest import ROOT, SHAPE, Artifacts, add_version, http_request, serve

SAMPLE = np.full((2, *SHAPE), 0.5).tolist()
CLIENT_LOGGERS = ("httpx", "httpcore")


class Lines(logging.Handler):
    """Every record, formatted as JSON and as text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.json: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._json, self._text = JsonFormatter(), TextFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(CLIENT_LOGGERS):
            return  # the test's own client logs its URLs: not the server's lines
        self.json.append(json.loads(self._json.format(record)))
        self.text.append(self._text.format(record))

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.json if line["logger"] == ACCESS_LOGGER]


@contextlib.contextmanager
def captured() -> Iterator[Lines]:
    lines = Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(lines)
        root.setLevel(level)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, artifacts: Artifacts) -> Path:
    root = tmp_path_factory.mktemp("store")
    add_version(root, artifacts)
    return root


def settings(store: Path, **values: Any) -> Settings:
    return Settings(model_store=store, default_model="tiny", **values)


def until(predicate: Any, timeout: float = 5.0) -> None:
    """The access line is written once the app returns, just after the client has its answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "no log line in time"
        time.sleep(0.01)


def test_access_lines_hold_the_request_fields(store: Path) -> None:
    app = create_app(settings(store, access_log=True, log_format="json"))
    with captured() as lines, serve(app) as base, httpx.Client(base_url=base) as client:
        lines.json.clear()
        ok = client.post("/predict?token=QUERYSECRET", json={"inputs": SAMPLE})
        v2_body = {"inputs": [{"name": "x", "shape": [2, *SHAPE], "datatype": "FP32",
                               "data": np.ravel(SAMPLE).tolist()}]}  # fmt: skip
        v2 = client.post("/v2/models/tiny/versions/1/infer", json=v2_body)
        missing = client.post("/models/nope/predict", json={"inputs": SAMPLE})
        probe = client.get("/healthz", headers={"X-Request-ID": "probe-1"})
        assert [r.status_code for r in (ok, v2, missing, probe)] == [200, 200, 404, 200]
        until(lambda: len(lines.access()) >= 4)
    by_id = {line["request_id"]: line for line in lines.access()}
    line = by_id[ok.headers["x-request-id"]]
    assert line["method"] == "POST" and line["path"] == "/predict"
    assert (line["status"], line["model"], line["version"], line["rows"]) == (200, "tiny", 1, 2)
    assert line["client"] == "127.0.0.1" and line["level"] == "info"
    assert 0 < line["latency_ms"] < 10_000
    assert line["ts"].endswith("Z")
    line = by_id[v2.headers["x-request-id"]]
    assert line["path"] == "/v2/models/tiny/versions/1/infer"
    assert (line["status"], line["model"], line["version"], line["rows"]) == (200, "tiny", 1, 2)
    line = by_id[missing.headers["x-request-id"]]
    assert (line["status"], line["model"], line["version"]) == (404, None, None)
    line = by_id["probe-1"]
    assert (line["path"], line["status"], line["model"]) == ("/healthz", 200, None)
    assert not any("QUERYSECRET" in text for text in lines.text)


def test_a_shed_request_names_its_model(store: Path) -> None:
    app = create_app(settings(store, access_log=True))
    with captured() as lines, serve(app) as base:
        shed = httpx.post(
            f"{base}/predict", json={"inputs": SAMPLE}, headers={"X-Request-Timeout": "1e-9"}
        )
        assert shed.status_code == 503
        until(lambda: any(x["request_id"] == shed.headers["x-request-id"] for x in lines.access()))
    (line,) = [x for x in lines.access() if x["request_id"] == shed.headers["x-request-id"]]
    assert (line["status"], line["model"], line["version"]) == (503, "tiny", 1)


def test_sample_zero_and_access_log_off_write_nothing(store: Path) -> None:
    for values in ({"access_log": True, "access_log_sample": 0.0}, {"access_log": False}):
        with captured() as lines, serve(create_app(settings(store, **values))) as base:
            for _ in range(5):
                assert httpx.post(f"{base}/predict", json={"inputs": SAMPLE}).status_code == 200
            time.sleep(0.1)
        assert lines.access() == [], values


def test_sampling_keeps_about_the_fraction_asked() -> None:
    log = AccessLog(sample=0.25, proxy_headers=False)

    async def requests() -> None:
        for _ in range(400):
            log(http_request("/", method="GET"), 204)

    with captured() as lines:
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
        asyncio.run(requests())
    assert 40 <= len(lines.access()) <= 160  # 100 expected; far outside these by chance: ~1e-9


def test_an_unexpected_error_line_carries_the_request_id(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.routes.predict as predict

    def broken(*args: Any) -> bytes:
        raise RuntimeError("encoder bug")

    monkeypatch.setattr(predict.PredictCodec, "encode", broken)
    with captured() as lines, serve(create_app(settings(store))) as base:
        response = httpx.post(f"{base}/predict", json={"inputs": SAMPLE})
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    (line,) = [x for x in lines.json if x["message"].startswith("unexpected error")]
    assert line["request_id"] == request_id and "encoder bug" in line["exc"]
    (text,) = [t for t in lines.text if t.split(": ", 1)[-1].startswith("unexpected error")]
    assert f"request_id={request_id}" in text.splitlines()[0]


def test_bodies_and_keys_are_never_logged(store: Path) -> None:
    key, wrong = "KEYMARKER-0c1d2e", "WRONGKEYMARKER-9f8e"
    body_marker = 0.7654321
    app = create_app(settings(store, api_key=key, access_log=True, log_level="debug"))
    with captured() as lines, serve(app, wait_loaded=False) as base:
        with httpx.Client(base_url=base) as client:
            inputs = np.full((1, *SHAPE), body_marker).tolist()
            for headers in (
                {"Authorization": f"Bearer {key}"},
                {"X-API-Key": key},
                {"X-API-Key": wrong},
                {"Authorization": f"Bearer {wrong}"},
            ):
                client.post("/predict", json={"inputs": inputs}, headers=headers)
                client.post("/predict", content=b'{"BODYMARKER": 1', headers=headers)
                client.post("/predict", json={"inputs": inputs, "BODYMARKER": 1}, headers=headers)
                client.get("/models", headers=headers)
        until(lambda: len(lines.access()) >= 16)
    everything = "\n".join(lines.text) + json.dumps(lines.json)
    assert "/predict" in everything  # the lines were captured
    for marker in (key, wrong, "KEYMARKER", "7654321", "BODYMARKER"):
        assert marker not in everything


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_json_format_makes_every_line_of_a_server_process_json(store: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FOLDSERVE_")}
    env |= {
        "FOLDSERVE_LOG_FORMAT": "json",
        "FOLDSERVE_ACCESS_LOG": "true",
        "FOLDSERVE_DEFAULT_MODEL": "tiny",
    }
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    command += ["--model-store", str(store)]
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None and time.monotonic() < deadline, err.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            time.sleep(0.05)
        response = httpx.post(
            f"http://127.0.0.1:{port}/predict",
            content=orjson.dumps({"inputs": SAMPLE}),
            headers={"X-Request-ID": "sub-1", "Content-Type": "application/json"},
        )
        assert response.status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    text = err.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # each one JSON
    assert out.read_text() == ""
    messages = {(line["logger"], line["message"].split(" (")[0]) for line in lines}
    assert any(
        logger == "service.http.server" and m.startswith("foldserve listening on http://")
        for logger, m in messages
    )
    assert any(line["logger"].startswith("service.") for line in lines)  # foldserve's own
    (access,) = [line for line in lines if line.get("request_id") == "sub-1"]
    assert (access["path"], access["status"], access["model"], access["rows"]) == (
        "/predict",
        200,
        "tiny",
        2,
    )
