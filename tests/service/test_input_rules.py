"""Strict input rules over real HTTP, on every inference route: what a body may be (its type and
encoding), numbers only where numbers belong, no key twice in an object, versions in the form the
store names them, every integer a client writes bounded; and no traceback logged for any of it.
"""

from __future__ import annotations

import gzip
import logging
import shlex
import shutil
import socket
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ROOT, Artifacts, add_version, reference, serve
from tests.service.test_app_e2e import samples

LIMIT = 200_000  # max_body_bytes here: far above these requests, so a zip bomb is cheap
PREDICT_ROUTES = ["/predict", "/models/tiny/predict", "/models/tiny/versions/1/predict"]
V2_ROUTES = ["/v2/models/tiny/infer", "/v2/models/tiny/versions/1/infer"]
ROUTES = PREDICT_ROUTES + V2_ROUTES
LENGTH = "Inference-Header-Content-Length"
X = samples(2, seed=11)  # (2, 2, 8)


@pytest.fixture(scope="module")
def rules_store(tmp_path_factory: pytest.TempPathFactory, artifacts: Artifacts) -> Path:
    root = tmp_path_factory.mktemp("rules") / "store"
    add_version(root, artifacts)
    return root


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(rules_store: Path) -> Iterator[tuple[str, Records]]:
    settings = Settings(
        model_store=rules_store, default_model="tiny", adaptive_delay=True, max_body_bytes=LIMIT
    )
    records = Records()
    # The root logger sees every line the server writes (the HTTP layer's included).
    loggers = [logging.getLogger(), logging.getLogger("service")]
    with serve(create_app(settings)) as base:
        for logger in loggers:
            logger.addHandler(records)
        try:
            yield base, records
        finally:
            for logger in loggers:
                logger.removeHandler(records)


@pytest.fixture
def base(server: tuple[str, Records]) -> Iterator[str]:
    """The server's URL; the test fails if the server logged a traceback or an error meanwhile:
    every request in this module is a client's doing, never the server's."""
    url, records = server
    seen = len(records.records)
    yield url
    logged = [r for r in records.records[seen:] if r.exc_info or r.levelno >= logging.ERROR]
    assert not logged, [f"{r.name}: {r.getMessage()}" for r in logged]


def body(route: str, x: np.ndarray = X, **tensor: Any) -> bytes:
    """A valid JSON request for ``route`` (``tensor`` overrides fields of the V2 tensor)."""
    if not route.startswith("/v2/"):
        return orjson.dumps({"inputs": x.tolist()})
    data = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return orjson.dumps({"inputs": [{**data, **tensor}]})


def answer(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    if "outputs" in response.json() and isinstance(response.json()["outputs"][0], dict):
        (output,) = response.json()["outputs"]
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    return np.asarray(response.json()["outputs"], dtype=np.float32)


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    message: str = response.json()["error"]
    return message


def binary_header() -> bytes:
    """The JSON header of a V2 binary request carrying X."""
    tensor = {"name": "x", "shape": [2, 2, 8], "datatype": "FP32"}
    return orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": X.nbytes}}]})


def post(base: str, route: str, content: bytes, **headers: str) -> httpx.Response:
    return httpx.post(base + route, content=content, headers=headers)


# ---------------------------------------------------------------- Content-Type


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "kind",
    [
        "text/plain",
        "text/plain;charset=UTF-8",  # what fetch() sends a string as
        "application/x-www-form-urlencoded",  # an HTML form; curl -d
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/json; charset=latin-1",
    ],
)
def test_a_body_that_is_not_json_is_refused_with_415(base: str, route: str, kind: str) -> None:
    message = error(post(base, route, body(route), **{"Content-Type": kind}), 415)
    assert "Content-Type: application/json" in message or "UTF-8 only" in message


@pytest.mark.parametrize("route", ROUTES)
def test_json_types_and_a_missing_type_are_read(base: str, route: str) -> None:
    kinds: list[str | None] = [
        None,  # tritonclient's default client, wrk, httpx and requests with raw bytes
        "application/json",
        "application/json; charset=utf-8",
        'Application/JSON;charset="UTF-8"',
        "application/vnd.example+json",
    ]
    answers = []
    for kind in kinds:
        headers = {} if kind is None else {"Content-Type": kind}
        answers.append(answer(post(base, route, body(route), **headers)))
    for got in answers[1:]:
        np.testing.assert_array_equal(got, answers[0])


def test_the_answers_are_the_models_own(base: str, rules_store: Path) -> None:
    for route in ROUTES:
        got = answer(post(base, route, body(route)))
        np.testing.assert_allclose(got, reference(rules_store, X), rtol=0, atol=1e-5)


def test_form_posts_are_told_how_to_send_json_with_curl(base: str) -> None:
    kind = {"Content-Type": "application/x-www-form-urlencoded"}
    message = error(post(base, "/predict", body("/predict"), **kind), 415)
    assert "curl -d" in message and "-H 'Content-Type: application/json'" in message


@pytest.mark.parametrize("route", ROUTES)
def test_a_browser_request_must_name_its_type(base: str, route: str) -> None:
    """A page can send an untyped body (a Blob) cross-site without a preflight: with Origin, the
    type is required; named as JSON, the browser would have had to ask (and be refused) first."""
    origin = {"Origin": "https://elsewhere.example"}
    assert "carries Origin" in error(post(base, route, body(route), **origin), 415)
    typed = post(base, route, body(route), **origin, **{"Content-Type": "application/json"})
    assert typed.status_code == 200


def test_octet_stream_is_v2_only(base: str) -> None:
    octet = {"Content-Type": "application/octet-stream"}
    head = binary_header()
    binary = post(base, V2_ROUTES[0], head + X.tobytes(), **octet, **{LENGTH: str(len(head))})
    # tritonclient's aiohttp client labels a JSON-only request octet-stream too.
    json_only = post(base, V2_ROUTES[0], body(V2_ROUTES[0]), **octet)
    np.testing.assert_array_equal(answer(binary), answer(json_only))
    assert "application/json" in error(post(base, "/predict", body("/predict"), **octet), 415)


def test_the_readmes_curl_examples_work(shipped_store: Path) -> None:
    """Run the README's curl examples of inference on localhost:8000, as written, on a real
    server: the answer must start and end as the README shows it on the next line."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    lines = (ROOT / "README.md").read_text().splitlines()
    examples = [
        (line, lines[i + 1])
        for i, line in enumerate(lines)
        if line.startswith("curl ")
        and "localhost:8000/" in line
        and " -d " in line
        and ("/predict" in line or "/infer" in line)
    ]
    assert examples, "the README shows no curl example of inference on localhost:8000"
    with serve(create_app(Settings(model_store=shipped_store))) as url:
        for command, shown in examples:
            argv = shlex.split(command.replace("localhost:8000", url.removeprefix("http://")))
            done = subprocess.run(argv, capture_output=True, timeout=30, check=True)
            # The answer as the README shows it below the command: its start and its labels.
            shown_start, _, shown_rest = shown.removeprefix("# ").partition('"outputs"')
            assert done.stdout.startswith(shown_start.encode()), done.stdout[:200]
            labels = orjson.dumps(orjson.loads(done.stdout)["predictions"]).decode()
            assert f'"predictions":{labels}' in shown_rest
        # The same example without the header, as curl -d sends it: told what to add.
        plain = [a for a in argv if a not in ("-H", "Content-Type: application/json")]
        refused = subprocess.run(plain, capture_output=True, timeout=30, check=True)
        assert "add -H 'Content-Type: application/json'" in orjson.loads(refused.stdout)["error"]


# ---------------------------------------------------------------- Content-Encoding


def test_gzip_and_deflate_bodies_are_decoded(base: str) -> None:
    expected = answer(post(base, "/predict", body("/predict")))
    for route in ROUTES:
        plain = body(route)
        for encoding, packed in [
            ("gzip", gzip.compress(plain)),
            ("x-gzip", gzip.compress(plain)),
            ("GZIP", gzip.compress(plain)),
            ("deflate", zlib.compress(plain)),  # as tritonclient compresses
            ("identity", plain),
        ]:
            got = answer(post(base, route, packed, **{"Content-Encoding": encoding}))
            np.testing.assert_array_equal(got.reshape(expected.shape), expected)


def test_a_compressed_v2_binary_request_as_tritonclient_sends_it(base: str) -> None:
    head = binary_header()
    headers = {LENGTH: str(len(head)), "Content-Encoding": "gzip"}  # the length before gzip
    got = post(base, V2_ROUTES[0], gzip.compress(head + X.tobytes()), **headers)
    np.testing.assert_array_equal(answer(got), answer(post(base, V2_ROUTES[0], body(V2_ROUTES[0]))))


def test_a_zip_bomb_is_refused_with_413_naming_the_limit(base: str) -> None:
    bomb = gzip.compress(b'{"inputs": [[' + b" " * (20 * LIMIT) + b"]]}")
    assert len(bomb) < LIMIT // 20  # small as sent: only its decoded size is over the limit
    for route in ROUTES:
        message = error(post(base, route, bomb, **{"Content-Encoding": "gzip"}), 413)
        assert f"exceeds max_body_bytes (FOLDSERVE_MAX_BODY_BYTES={LIMIT}" in message
        assert "once decoded" in message

    def chunks() -> Iterator[bytes]:  # streamed, without a Content-Length
        yield from (bomb[i : i + 512] for i in range(0, len(bomb), 512))

    streamed = httpx.post(base + "/predict", content=chunks(), headers={"Content-Encoding": "gzip"})
    assert "once decoded" in error(streamed, 413)


@pytest.mark.parametrize("route", ROUTES)
def test_other_encodings_are_415_and_say_which_are_read(base: str, route: str) -> None:
    for encoding in ("br", "zstd", "compress", "gzip, gzip", "gzip, identity"):
        response = post(base, route, body(route), **{"Content-Encoding": encoding})
        assert "gzip, deflate" in error(response, 415)
        assert response.headers["accept-encoding"] == "gzip, deflate"


def test_broken_compressed_bodies_are_400(base: str) -> None:
    packed = gzip.compress(body("/predict"))
    for content, message in [
        (b"not gzip at all", "not valid gzip data"),
        (packed[:-6], "ends before its end of stream"),
        (packed + b"tail", "4 bytes follow the end of the gzip stream"),
    ]:
        response = post(base, "/predict", content, **{"Content-Encoding": "gzip"})
        assert message in error(response, 400)


# ---------------------------------------------------------------- numbers only


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


@pytest.mark.parametrize(
    "inputs",
    [
        [[True] + [0] * 15],  # numpy: int64 [[1, 0, ...]]
        [[True] + [0.5] * 15],  # numpy: float64
        [[[1.5] * 8, [False] + [0] * 7]],  # nested, one boolean deep inside
        [[0.5] * 16, [1.0] * 15 + [True]],  # in a later sample
        [[True] * 16],  # numpy: bool (refused before this rule too)
    ],
)
def test_booleans_are_not_numbers_on_predict(base: str, inputs: list[Any]) -> None:
    for route in PREDICT_ROUTES:
        response = post(base, route, _json({"inputs": inputs}).encode())
        assert "numbers only" in error(response, 400)


@pytest.mark.parametrize(
    "data",
    [
        [True] + [0.0] * 31,
        [1] * 31 + [False],
        [[[0.5] * 8, [True] * 8], [[0.5] * 8] * 2],
    ],
)
def test_booleans_are_not_numbers_on_v2(base: str, data: list[Any]) -> None:
    for route in V2_ROUTES:
        response = post(base, route, body(route, data=data))
        assert "numbers only" in error(response, 400)


def test_true_and_false_elsewhere_in_v2_json_are_fine(base: str) -> None:
    """The words in parameters make the check walk the data: it finds numbers only."""
    request = orjson.loads(body(V2_ROUTES[0]))
    request["outputs"] = [{"name": "logits", "parameters": {"binary_data": False}}]
    request["parameters"] = {"binary_data_output": False, "note": "true or false"}
    got = answer(post(base, V2_ROUTES[0], orjson.dumps(request)))
    np.testing.assert_array_equal(got, answer(post(base, V2_ROUTES[0], body(V2_ROUTES[0]))))


# ---------------------------------------------------------------- keys once


@pytest.mark.parametrize(
    ("route", "content", "key"),
    [
        ("/predict", b'{"inputs": [[0]], "inputs": %s}' % body("/predict")[10:-1], "'inputs'"),
        (
            "/predict",
            b'{"version": 1, "inputs": %s, "version": 1}' % body("/predict")[10:-1],
            "'version'",
        ),
        (
            "/models/tiny/predict",
            b'{"model": "tiny", "model": "other", "inputs": [[0]]}',
            "'model'",
        ),
        (
            "/v2/models/tiny/infer",
            body(V2_ROUTES[0])[:-3] + b', "datatype": "FP64"}]}',
            "'datatype'",
        ),
        ("/v2/models/tiny/infer", body(V2_ROUTES[0])[:-1] + b', "id": "a", "id": "b"}', "'id'"),
        (
            "/v2/models/tiny/infer",
            body(V2_ROUTES[0])[:-1]
            + b', "parameters": {"binary_data_output": true, "binary_data_output": false}}',
            "'binary_data_output'",
        ),
    ],
)
def test_a_key_twice_in_one_object_is_refused(
    base: str, route: str, content: bytes, key: str
) -> None:
    message = error(post(base, route, content), 400)
    assert f"repeats {key} within one object" in message


def test_a_key_twice_in_a_binary_requests_header_is_refused(base: str) -> None:
    head = binary_header()[:-1] + b',"inputs":[]}'
    response = post(base, V2_ROUTES[0], head + X.tobytes(), **{LENGTH: str(len(head))})
    assert "repeats 'inputs' within one object" in error(response, 400)


def test_keys_repeated_across_objects_and_key_text_in_strings_are_fine(base: str) -> None:
    """What the cheap count cannot vouch for (colons and key names inside strings, one key in
    several objects) is looked at exactly, and accepted."""
    request = orjson.loads(body(V2_ROUTES[0]))
    request["id"] = 'req:1 "name": "data": {"id": 2}'
    request["outputs"] = [{"name": "logits", "parameters": {"binary_data": False}}]
    request["parameters"] = {"name": "a:b"}
    got = answer(post(base, V2_ROUTES[0], orjson.dumps(request)))
    assert got.shape == (2, 4)
    spaced = b'{ "inputs" : %s , "model" : "tiny" }' % body("/predict")[10:-1]
    assert post(base, "/predict", spaced).status_code == 200


# ---------------------------------------------------------------- versions and integers


BAD_VERSIONS = ["01", "+1", "%201", "1%20", "1.0", "1e0", "0", "-1", "0x1", "%EF%BC%91", "9" * 5000]


@pytest.mark.parametrize("version", [*BAD_VERSIONS, "1000000000", "v10"])
def test_a_version_not_in_its_folders_form_is_400_on_predict_and_404_on_v2(
    base: str, version: str
) -> None:
    path = f"/models/tiny/versions/{version}/predict"
    message = error(post(base, path, body(path)), 400)
    assert "version in the path must be a positive integer" in message
    assert "no leading zero, sign or space" in message and len(message) < 300
    # The Open Inference Protocol: a version that does not exist is 404, whatever its spelling.
    path = f"/v2/models/tiny/versions/{version}/infer"
    message = error(post(base, path, body(path)), 404)
    assert "model 'tiny' has no version" in message and len(message) < 300
    for path in ("", "/ready", "/config", "/stats"):
        response = httpx.get(f"{base}/v2/models/tiny/versions/{version}{path}")
        assert "model 'tiny' has no version" in error(response, 404)


def test_a_well_formed_version_the_model_lacks_is_404(base: str) -> None:
    for path in ("/models/tiny/versions/2/predict", "/v2/models/tiny/versions/999999999/infer"):
        assert "has no version" in error(post(base, path, body(path)), 404)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("0", "\"version\" must be from 1 to 999999999, got '0'"),
        ("-1", '"version" must be from 1 to 999999999'),
        ("1000000000", '"version" must be from 1 to 999999999'),
        ("18446744073709551615", '"version" must be from 1 to 999999999'),
        ("1.0", '"version" must be an integer'),
        ("true", '"version" must be an integer'),
        ("1e400", "not valid JSON"),
        ("9" * 5000, "not valid JSON"),
    ],
)
def test_a_version_in_the_body_is_bounded(base: str, version: str, message: str) -> None:
    content = b'{"inputs": %s, "version": %s}' % (_json(X.tolist()).encode(), version.encode())
    assert message in error(post(base, "/predict", content), 400)


def test_a_path_with_a_trailing_newline_is_no_inference_route(base: str) -> None:
    assert post(base, "/models/tiny/predict%0A", body("/predict")).status_code == 404


@pytest.mark.parametrize(
    "value", [b"9" * 5000, b"-1", b"1.5", b"0x10", b"1e3", "\u0661\u0662".encode(), "²".encode()]
)
def test_a_header_length_that_is_not_a_bounded_count_is_400(base: str, value: bytes) -> None:
    route = V2_ROUTES[0]
    response = httpx.post(base + route, content=body(route), headers={LENGTH: value})
    message = error(response, 400)
    assert "Inference-Header-Content-Length must be a byte count" in message
    assert len(message) < 200


@pytest.mark.parametrize(
    "tensor",
    [
        {"shape": [2**63, 2, 8]},
        {"shape": [2**64 - 1, 2, 8]},
        {"shape": [2, 2**40, 8]},
        {"shape": [2, 2, 8], "parameters": {"binary_data_size": 2**64 - 1}},
        {"shape": [2, 2, 8], "parameters": {"binary_data_size": 2**63}},
    ],
)
def test_huge_v2_sizes_are_400(base: str, tensor: dict[str, Any]) -> None:
    route = V2_ROUTES[0]
    binary = "binary_data_size" in tensor.get("parameters", {})
    header = {"name": "x", "datatype": "FP32", **tensor}
    if binary:
        head = orjson.dumps({"inputs": [header]})
        response = post(base, route, head + X.tobytes(), **{LENGTH: str(len(head))})
    else:
        response = post(base, route, orjson.dumps({"inputs": [{**header, "data": [0.0] * 32}]}))
    error(response, 400)


def test_a_huge_timeout_is_capped_not_an_error(base: str) -> None:
    request = orjson.loads(body(V2_ROUTES[0]))
    request["parameters"] = {"timeout": 2**64 - 1}  # microseconds; capped by request_timeout_s
    assert post(base, V2_ROUTES[0], orjson.dumps(request)).status_code == 200
    long = {"X-Request-Timeout": "9" * 5000}
    assert "X-Request-Timeout" in error(post(base, "/predict", body("/predict"), **long), 400)


def test_a_content_length_of_5000_digits_is_refused_without_a_traceback(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n{}"
        )
        answer_ = conn.recv(4096)
    status = int(answer_.split(b" ", 2)[1])
    assert status in (400, 413), answer_[:200]


DEEP = b"[" * 1000 + b"1" + b"]" * 1000  # orjson parses up to 1,024 levels
DEEP_OBJECT = b'{"a":' * 1000 + b"1" + b"}" * 1000
SAMPLE = _json([[0.5] * 16]).encode()
TENSOR = b'"name": "x", "shape": [1, 2, 8], "datatype": "FP32"'


@pytest.mark.parametrize(
    ("route", "content"),
    [
        ("/predict", b'{"inputs": %s}' % DEEP),
        ("/predict", b'{"inputs": %s, "version": %s}' % (SAMPLE, DEEP)),
        ("/predict", b'{"inputs": %s, "model": %s}' % (SAMPLE, DEEP)),
        ("/predict", b'{"inputs": %s, "extra": %s}' % (SAMPLE, DEEP_OBJECT)),
        ("/predict", b'{"inputs": [%s], "model": "tiny"}' % DEEP_OBJECT),
        ("/v2/models/tiny/infer", b'{"inputs": [], "id": %s}' % DEEP),
        ("/v2/models/tiny/infer", b'{"inputs": [{"name": %s}]}' % DEEP),
        ("/v2/models/tiny/infer", b'{"inputs": [{"name": "x", "datatype": %s}]}' % DEEP),
        ("/v2/models/tiny/infer", b'{"inputs": [{%s, "data": %s}]}' % (TENSOR, DEEP)),
        (
            "/v2/models/tiny/infer",
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": %s}]}' % DEEP,
        ),
        (
            "/v2/models/tiny/infer",
            b'{"inputs": [{%s, "parameters": {"binary_data_size": %s}}]}' % (TENSOR, DEEP),
        ),
        (
            "/v2/models/tiny/infer",
            b'{"inputs": [{%s, "data": [0]}], "outputs": [{"name": %s}]}' % (TENSOR, DEEP),
        ),
        (
            "/v2/models/tiny/infer",
            b'{"inputs": [{%s, "data": [0]}], "id": "a:b", "x": %s}' % (TENSOR, DEEP_OBJECT),
        ),
    ],
)
def test_values_nested_a_thousand_deep_are_400(base: str, route: str, content: bytes) -> None:
    """A nested value's repr, or a recursive walk of it, would pass Python's recursion limit."""
    message = error(post(base, route, content), 400)
    assert len(message) < 300
