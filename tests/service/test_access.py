"""Access control: inference keys on every inference and model route, the probes open, /metrics
by a setting, the management key apart; keys compared in constant time, read again from their
file at a rescan, and never logged."""

from __future__ import annotations

import hmac
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from service import keys as keys_module
from service.app import create_app
from service.errors import ConfigError
from service.keys import Keys, key_matches, presented_key
from service.settings import Settings
from tests.service.conftest import ROOT, SHAPE, Artifacts, add_version, running

KEYS = ("k-one-3f9a", "k-two-77c1")
FILE_KEY = "k-file-0b2e"
MANAGEMENT_KEY = "m-key-5d10"
SECRETS = (*KEYS, FILE_KEY, MANAGEMENT_KEY)
X = [[0.5] * SHAPE[1]] * SHAPE[0]  # one sample
V2 = {"inputs": [{"name": "x", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * 16}]}

# Every route behind the inference key: (method, path, JSON body).
GUARDED: list[tuple[str, str, Any]] = [
    ("POST", "/predict", {"inputs": [X]}),
    ("POST", "/models/tiny/predict", {"inputs": [X]}),
    ("POST", "/models/tiny/versions/1/predict", {"inputs": [X]}),
    ("POST", "/v2/models/tiny/infer", V2),
    ("POST", "/v2/models/tiny/versions/1/infer", V2),
    ("GET", "/v2", None),
    ("GET", "/v2/", None),
    ("GET", "/v2/models/tiny", None),
    ("GET", "/v2/models/tiny/versions/1", None),
    ("GET", "/v2/models/tiny/ready", None),
    ("GET", "/v2/models/tiny/versions/1/ready", None),
    ("GET", "/v2/models/tiny/config", None),
    ("GET", "/v2/models/stats", None),
    ("GET", "/v2/models/tiny/stats", None),
    ("GET", "/v2/models/tiny/versions/1/stats", None),
    ("GET", "/models", None),
    ("GET", "/models/tiny", None),
    ("GET", "/models/tiny/drift", None),
    ("GET", "/ui/api/batch-norm", None),
    ("GET", "/openapi.json", None),
]
# The status page and its assets load without a key; the page asks for one when its reads get 401.
OPEN = [
    "/healthz",
    "/readyz",
    "/v2/health/live",
    "/v2/health/ready",
    "/metrics",
    "/",
    "/ui/status.js",
    "/ui/status.css",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, artifacts: Artifacts) -> Path:
    root = tmp_path_factory.mktemp("access") / "store"
    add_version(root, artifacts)
    return root


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# one key per line\n\n  {FILE_KEY}  \n")
    return path


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.format(record))


@pytest.fixture(scope="module")
def server(store: Path, key_file: Path) -> Iterator[tuple[str, Records]]:
    """A server with inference keys (two in the setting, one in a file) and a management key;
    every log line it writes, at every level, is kept."""
    settings = Settings(
        model_store=store,
        default_model="tiny",
        api_key=", ".join(KEYS),
        api_key_file=key_file,
        management_api=True,
        management_api_key=MANAGEMENT_KEY,
        access_log=True,
        log_level="debug",
    )
    records = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with running(create_app(settings), key=KEYS[0]) as (base, _):
            yield base, records
    finally:
        root.removeHandler(records)
        root.setLevel(level)


@pytest.fixture(scope="module")
def client(server: tuple[str, Records]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=30) as client:
        yield client


def call(client: httpx.Client, method: str, path: str, body: Any, **headers: str) -> httpx.Response:
    content = None if body is None else orjson.dumps(body)
    if content is not None:
        headers["Content-Type"] = "application/json"
    return client.request(method, path, content=content, headers=headers)


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
def test_every_inference_and_model_route_needs_an_inference_key(
    client: httpx.Client, method: str, path: str, body: Any
) -> None:
    refused = [
        call(client, method, path, body),
        call(client, method, path, body, Authorization="Bearer nope"),
        call(client, method, path, body, **{"X-API-Key": "nope"}),
        call(client, method, path, body, **{"X-API-Key": MANAGEMENT_KEY}),  # another guard's key
        call(client, method, path, body, Authorization=f"Basic {KEYS[0]}"),
    ]
    for response in refused:
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == 'Bearer realm="foldserve"'
        assert response.json() == {
            "error": "a valid key is required (api_key): send Authorization: Bearer <key> or "
            "X-API-Key: <key>"
        }
    accepted = [
        call(client, method, path, body, Authorization=f"Bearer {KEYS[0]}"),
        call(client, method, path, body, Authorization=f"bearer {KEYS[1]}"),
        call(client, method, path, body, **{"X-API-Key": KEYS[1]}),
        call(client, method, path, body, **{"X-API-Key": FILE_KEY}),
    ]
    for response in accepted:
        assert response.status_code == 200, (path, response.text)


def test_binary_v2_requests_need_the_key_too(server: tuple[str, Records]) -> None:
    base, _ = server
    raw = b"\0" * 64
    head = {**V2["inputs"][0], "parameters": {"binary_data_size": len(raw)}}
    del head["data"]
    header = orjson.dumps({"inputs": [head]})
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    url = f"{base}/v2/models/tiny/infer"
    assert httpx.post(url, content=header + raw, headers=headers).status_code == 401
    headers["X-API-Key"] = KEYS[0]
    assert httpx.post(url, content=header + raw, headers=headers).status_code == 200


def test_probes_and_metrics_stay_open_and_readiness_lists_no_models(
    server: tuple[str, Records],
) -> None:
    base, _ = server
    for path in OPEN:
        assert httpx.get(base + path).status_code == 200, path
    ready = httpx.get(f"{base}/readyz").json()
    assert ready == {"ready": True, "reason": "default model 'tiny' version 1 is ready"}


def test_the_management_api_takes_its_own_key_only(server: tuple[str, Records]) -> None:
    base, _ = server
    url = f"{base}/v2/repository/index"
    assert httpx.post(url, headers={"X-API-Key": KEYS[0]}).status_code == 401
    assert httpx.post(url, headers={"X-API-Key": MANAGEMENT_KEY}).status_code == 200


def test_no_key_ever_reaches_the_log(server: tuple[str, Records], client: httpx.Client) -> None:
    _, records = server
    # Every route, with right and wrong keys, the access log on, at debug level.
    for method, path, body in GUARDED:
        for key in (*SECRETS, "wrong-key-9"):
            call(client, method, path, body, Authorization=f"Bearer {key}")
            call(client, method, path, body, **{"X-API-Key": key})
    time.sleep(0.2)
    assert any("/predict" in message for message in records.messages)  # the log did run
    leaked = [m for m in records.messages for key in (*SECRETS, "wrong-key-9") if key in m]
    assert not leaked


def test_metrics_require_the_inference_key_when_asked(store: Path) -> None:
    settings = Settings(
        model_store=store, default_model="tiny", api_key=KEYS[0], metrics_require_key=True
    )
    with running(create_app(settings), key=KEYS[0]) as (base, _):
        assert httpx.get(f"{base}/metrics").status_code == 401
        answer = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert answer.status_code == 200 and "foldserve_requests_total" in answer.text
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_without_keys_the_raw_routes_do_not_even_check(store: Path) -> None:
    app = create_app(Settings(model_store=store, default_model="tiny"))
    assert app.state.dataplane.keys is None
    keyed = create_app(Settings(model_store=store, default_model="tiny", api_key=KEYS[0]))
    assert keyed.state.dataplane.keys is not None


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every accepted key is compared, always, with hmac.compare_digest: which key matched, or
    how much of one, does not change the work done."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    keys = [b"first-key", b"second-key", b"third-key"]
    for presented, expected in [
        (b"first-key", True),
        (b"third-key", True),
        (b"first-kez", False),
        (b"", False),
        (None, False),
    ]:
        calls.clear()
        assert key_matches(presented, keys) is expected
        assert [b for _, b in calls] == keys


def test_the_key_a_request_carries() -> None:
    assert presented_key([(b"authorization", b"Bearer  abc ")]) == b"abc"
    assert presented_key([(b"x-api-key", b"abc")]) == b"abc"
    assert presented_key([(b"x-api-key", b"xyz"), (b"authorization", b"Bearer abc")]) == b"abc"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert presented_key([(b"authorization", b"Bearer ")]) is None
    assert presented_key([]) is None


def test_the_key_file_is_read_again_at_each_rescan(
    tmp_path: Path, store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    path.write_text("old-key-1\n")
    settings = Settings(
        model_store=store, default_model="tiny", api_key_file=path, poll_interval_s=0.05
    )

    def status(key: str) -> int:
        return httpx.get(f"{base}/v2/models/tiny", headers={"X-API-Key": key}).status_code

    def until(key: str, code: int) -> None:
        deadline = time.monotonic() + 10
        while status(key) != code:
            assert time.monotonic() < deadline, f"{key} never got {code}"
            time.sleep(0.05)

    with running(create_app(settings), key="old-key-1") as (base, _):
        assert status("old-key-1") == 200
        path.write_text("new-key-2\n")  # rotated in place, as a mounted Secret is
        until("new-key-2", 200)
        assert status("old-key-1") == 401
        path.write_text("# emptied by mistake\n")
        time.sleep(0.3)  # several rescans
        assert status("new-key-2") == 200  # an empty file never turns the keys off
    assert "holds no key" in caplog.text and "new-key-2" not in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot be read: No such file or directory"), ("# none\n\n", "holds no key")],
)
def test_a_key_file_that_gives_no_key_is_refused(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        Keys("api_key", None, path)


@pytest.mark.parametrize("value", ["", " ", " , ,"])
def test_a_key_setting_holding_no_key_is_refused(value: str) -> None:
    for field in ("api_key", "management_api_key"):
        with pytest.raises(ValueError, match="is set but holds no key"):
            Settings(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metrics_require_key needs the inference key"):
        Settings(metrics_require_key=True)


def test_an_invalid_setting_is_reported_without_the_keys(tmp_path: Path) -> None:
    """pydantic's own message repeats every input of a check across fields, keys included."""
    env = {
        "PATH": "/usr/bin:/bin",
        "FOLDSERVE_API_KEY": KEYS[0],
        "FOLDSERVE_MANAGEMENT_API_KEY": MANAGEMENT_KEY,
        "FOLDSERVE_METRICS_DIR": str(tmp_path),  # refused: only the supervisor sets it
    }
    done = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "metrics_dir is set by the --workers supervisor" in done.stderr
    assert KEYS[0] not in done.stderr + done.stdout
    assert MANAGEMENT_KEY not in done.stderr + done.stdout


def test_docs_pages_are_off_unless_asked_and_then_the_document_is_open(store: Path) -> None:
    keyed = Settings(model_store=store, default_model="tiny", api_key=KEYS[0])
    with running(create_app(keyed), wait_loaded=False) as (base, _):
        assert httpx.get(f"{base}/docs").status_code == 404
        assert httpx.get(f"{base}/redoc").status_code == 404
        assert httpx.get(f"{base}/openapi.json").status_code == 401
    published = keyed.model_copy(update={"docs": True})
    with running(create_app(published), wait_loaded=False) as (base, _):
        assert "swagger" in httpx.get(f"{base}/docs").text.lower()
        assert "redoc" in httpx.get(f"{base}/redoc").text.lower()
        assert httpx.get(f"{base}/openapi.json").status_code == 200
        assert httpx.get(f"{base}/models").status_code == 401  # the API itself stays guarded
