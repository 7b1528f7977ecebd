"""KServe V2 / Open Inference Protocol end to end: the production server, real onnxruntime.

Binary bodies are built by hand (JSON header, then raw little-endian tensors), as tritonclient
sends them, so the wire format itself is what is tested.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service import __version__
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import SHAPE, Artifacts, add_version, reference, serve
from tests.service.test_app_e2e import metric_samples, samples

INFER = "/v2/models/tiny/infer"
LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def v2_store(tmp_path_factory: pytest.TempPathFactory, artifacts: Artifacts) -> Path:
    root = tmp_path_factory.mktemp("v2") / "store"
    add_version(root, artifacts)
    return root


@pytest.fixture(scope="module")
def base(v2_store: Path) -> Iterator[str]:
    settings = Settings(model_store=v2_store, default_model="tiny", adaptive_delay=True)
    with serve(create_app(settings)) as url:
        yield url


def tensor(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", **extra}


def binary_body(header: dict[str, Any], raw: bytes) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a binary-tensor request: JSON header, then the raw tensors."""
    head = orjson.dumps(header)
    return head + raw, {LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def binary_answer(response: httpx.Response) -> tuple[dict[str, Any], np.ndarray]:
    """The JSON header of a binary answer and its one output tensor."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[LENGTH])
    header: dict[str, Any] = orjson.loads(response.content[:length])
    (output,) = header["outputs"]
    raw = response.content[length:]
    assert output["parameters"]["binary_data_size"] == len(raw)
    return header, np.frombuffer(raw, dtype="<f4").reshape(output["shape"])


def json_answer(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "logits" and output["datatype"] == "FP32"
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def test_server_and_model_metadata_health_and_config(base: str) -> None:
    for path in ("/v2", "/v2/"):  # the second as the protocol's document writes it: no redirect
        assert httpx.get(f"{base}{path}").json() == {
            "name": "foldserve",
            "version": __version__,
            # model_repository only with the management API on (tests/service/test_stats.py)
            "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
        }
    assert httpx.get(f"{base}/v2/health/live").status_code == 200
    assert httpx.get(f"{base}/v2/health/ready").status_code == 200
    for path in ("/v2/models/tiny", "/v2/models/tiny/versions/1"):
        assert httpx.get(base + path).json() == {
            "name": "tiny",
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}],
        }
        assert httpx.get(f"{base}{path}/ready").status_code == 200
    config = httpx.get(f"{base}/v2/models/tiny/config").json()
    assert config["max_batch_size"] >= 64 and config["platform"] == "onnxruntime_onnx"
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": list(SHAPE)}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [4]}]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/models/nope", 404),
        ("/v2/models/nope/ready", 404),
        ("/v2/models/nope/config", 404),
        ("/v2/models/tiny/versions/9", 404),
        ("/v2/models/tiny/versions/9/ready", 404),
        ("/v2/models/tiny/versions/one", 404),  # the protocol: no such version, whatever its form
        ("/v2/models/tiny/versions/v10", 404),
        ("/v2/models/tiny/versions/01/ready", 404),
        ("/v2/nothing-here", 404),
        ("/v2/models/tiny/", 404),  # no redirect to an http:// URL (wrong behind TLS)
    ],
)
def test_metadata_errors_are_v2_errors(base: str, path: str, status: int) -> None:
    response = httpx.get(base + path)
    assert response.status_code == status
    assert list(response.json()) == ["error"]


def test_not_ready_server_answers_503(tmp_path: Path, artifacts: Artifacts) -> None:
    store = tmp_path / "store"
    add_version(store, artifacts)
    add_version(store, artifacts, "other")  # two models: neither answers for "missing"
    settings = Settings(model_store=store, default_model="missing", missing_model="unready")
    with serve(create_app(settings)) as url:
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        response = httpx.get(f"{url}/v2/health/ready")
    assert response.status_code == 503 and "missing" in response.json()["error"]


def test_limits_answer_413_with_a_v2_error(v2_store: Path) -> None:
    settings = Settings(
        model_store=v2_store, default_model="tiny", max_body_bytes=1024, max_queue_rows=4
    )
    x = samples(5, seed=6)  # 5 rows: more than can ever queue
    content, headers = binary_body(
        {"inputs": [tensor(x, parameters={"binary_data_size": x.nbytes})]}, x.tobytes()
    )
    big = samples(8, seed=6)  # 8 rows of 16 floats: 512 bytes of floats, far more as JSON text
    with serve(create_app(settings)) as url:
        too_many = httpx.post(url + INFER, content=content, headers=headers)
        too_big = httpx.post(url + INFER, json={"inputs": [tensor(big, data=big.tolist())]})
    for response in (too_many, too_big):
        assert response.status_code == 413 and list(response.json()) == ["error"]
    assert "max_queue_rows" in too_many.json()["error"]
    assert "max_body_bytes" in too_big.json()["error"]


def test_json_infer_equals_the_model_files_own_outputs(base: str, v2_store: Path) -> None:
    x = samples(5, seed=2)
    expected = reference(v2_store, x)
    flat = {"id": "r-1", "inputs": [tensor(x, data=x.reshape(-1).tolist())]}
    nested = {"inputs": [tensor(x, data=x.tolist())]}
    answers = [
        httpx.post(base + INFER, json=flat),
        httpx.post(f"{base}/v2/models/tiny/versions/1/infer", json=nested),
    ]
    for response in answers:
        np.testing.assert_array_equal(json_answer(response), expected)
    body = answers[0].json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("tiny", "1", "r-1")
    assert "id" not in answers[1].json()


def test_binary_round_trip_equals_the_json_path(base: str, v2_store: Path) -> None:
    x = samples(7, seed=3)
    size = x.nbytes
    header = {
        "id": "b",
        "inputs": [tensor(x, parameters={"binary_data_size": size})],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    content, headers = binary_body(header, x.astype("<f4").tobytes())
    answer, out = binary_answer(httpx.post(base + INFER, content=content, headers=headers))
    by_json = json_answer(httpx.post(base + INFER, json={"inputs": [tensor(x, data=x.tolist())]}))
    np.testing.assert_array_equal(out, by_json)
    np.testing.assert_array_equal(out, reference(v2_store, x))
    assert (answer["model_name"], answer["id"], answer["outputs"][0]["shape"]) == (
        "tiny",
        "b",
        [7, 4],
    )

    # Request-level binary_data_output, and wider datatypes cast to float32 like JSON numbers.
    x64 = x.astype("<f8")
    header = {
        "inputs": [
            {**tensor(x), "datatype": "FP64", "parameters": {"binary_data_size": x64.nbytes}}
        ],
        "parameters": {"binary_data_output": True},
    }
    content, headers = binary_body(header, x64.tobytes())
    _, out64 = binary_answer(httpx.post(base + INFER, content=content, headers=headers))
    np.testing.assert_array_equal(out64, by_json)


def test_mixed_binary_in_json_out_and_json_in_binary_out(base: str, v2_store: Path) -> None:
    x = samples(3, seed=4)
    expected = reference(v2_store, x)
    header = {"inputs": [tensor(x, parameters={"binary_data_size": x.nbytes})]}
    content, headers = binary_body(header, x.tobytes())
    response = httpx.post(base + INFER, content=content, headers=headers)
    assert response.headers["content-type"] == "application/json"
    np.testing.assert_array_equal(json_answer(response), expected)

    ints = np.arange(2 * 16).reshape(2, *SHAPE)
    as_ints = {
        "inputs": [{"name": "x", "shape": [2, *SHAPE], "datatype": "INT32", "data": ints.tolist()}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    _, out = binary_answer(httpx.post(base + INFER, json=as_ints))
    np.testing.assert_array_equal(out, reference(v2_store, ints.astype(np.float32)))


X = np.zeros((2, *SHAPE), dtype=np.float32)
RAW = X.tobytes()


def _json_case(**override: Any) -> tuple[bytes, dict[str, str]]:
    return orjson.dumps({"inputs": [{**tensor(X, data=X.reshape(-1).tolist()), **override}]}), {}


def _binary_case(size: int, raw: bytes = RAW) -> tuple[bytes, dict[str, str]]:
    return binary_body({"inputs": [tensor(X, parameters={"binary_data_size": size})]}, raw)


def _wrong_output() -> tuple[bytes, dict[str, str]]:
    body = {"inputs": [tensor(X, data=X.reshape(-1).tolist())], "outputs": [{"name": "y"}]}
    return orjson.dumps(body), {}


def _no_data() -> tuple[bytes, dict[str, str]]:
    return orjson.dumps({"inputs": [tensor(X)]}), {}


def _long_header() -> tuple[bytes, dict[str, str]]:
    content, headers = _binary_case(len(RAW))
    return content, {**headers, LENGTH: str(len(content) + 1)}


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        (_json_case(name="input_0"), 400, "this model's input is 'x'"),
        (_json_case(datatype="BYTES"), 400, "'BYTES'"),
        (_json_case(datatype="BF16"), 400, "'BF16'"),
        (_json_case(datatype="INT32"), 400, "INT32 numbers only"),  # 0.0 is not an INT32
        (_json_case(data=[True] * 32), 400, "FP32 numbers only"),
        (_json_case(shape=[3, *SHAPE]), 400, "needs 48 values"),
        (_json_case(shape=[2, 16]), 400, "shape must be [n, 2, 8]"),
        (_json_case(data=["a"] * 32), 400, "numbers only"),
        (_binary_case(len(RAW) - 4), 400, "binary_data_size is 124"),
        (_binary_case(len(RAW), RAW[:-4]), 400, "124 bytes follow"),
        (_long_header(), 400, "Inference-Header-Content-Length is"),
        ((b"{", {}), 400, "JSON is not valid"),
        ((orjson.dumps({"inputs": []}), {}), 400, "list of one tensor"),
        (_wrong_output(), 400, "output 'y' does not exist"),
        (_no_data(), 400, 'has no "data"'),
        (_binary_case(len(RAW), RAW + b"xx"), 400, "130 bytes follow"),
        ((b'{"inputs": [], "model_name": "other"}', {}), 400, "'other' in the body but 'tiny'"),
        ((b'{"inputs": [], "model_version": 1}', {}), 400, '"model_version" must be a string'),
        ((b'{"inputs": [], "model_version": "2"}', {}), 404, "model 'tiny' has no version 2"),
        ((b'{"inputs": [], "model_version": "v1"}', {}), 404, "has no version 'v1'"),
        ((b'{"inputs": [], "id": 7}', {}), 400, '"id" must be a string'),
    ],
)
def test_bad_requests_fail_with_a_v2_error(
    base: str, request_: tuple[bytes, dict[str, str]], status: int, message: str
) -> None:
    content, headers = request_
    response = httpx.post(base + INFER, content=content, headers=headers)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    assert message in response.json()["error"]


def test_a_refused_tensor_is_counted_for_the_model_it_was_sent_to(base: str) -> None:
    key = "foldserve_requests_total{code=400,model=tiny,version=1}"
    before = metric_samples(base, "foldserve_requests_total").get(key, 0)
    content, headers = _json_case(shape=[2, 16])
    assert httpx.post(base + INFER, content=content, headers=headers).status_code == 400
    assert metric_samples(base, "foldserve_requests_total")[key] == before + 1


def test_a_version_in_the_path_that_is_not_a_number_is_404_on_v2_and_400_on_predict(
    base: str,
) -> None:
    v2 = {"inputs": [tensor(X, data=X.reshape(-1).tolist())]}
    response = httpx.post(f"{base}/v2/models/tiny/versions/one/infer", json=v2)
    assert response.status_code == 404, response.text
    assert "model 'tiny' has no version 'one'" in response.json()["error"]
    response = httpx.post(f"{base}/models/tiny/versions/one/predict", json={"inputs": X.tolist()})
    assert response.status_code == 400, response.text
    assert "version in the path must be a positive integer, got 'one'" in response.json()["error"]


def test_unknown_top_level_fields_are_ignored_and_model_fields_must_agree(
    base: str, v2_store: Path
) -> None:
    """As the KServe SDK sends them: "model_name" and "id" beside the inputs, and other clients'
    own fields, which the protocol's schema allows."""
    data = X.reshape(-1).tolist()
    request = {
        "id": "r-1",
        "model_name": "tiny",
        "model_version": "1",
        "inputs": [tensor(X, data=data)],
        "client_trace": {"anything": [1, 2]},
    }
    for path in (INFER, "/v2/models/tiny/versions/1/infer"):
        response = httpx.post(base + path, json=request)
        np.testing.assert_allclose(json_answer(response), reference(v2_store, X), atol=1e-5)
        assert response.json()["id"] == "r-1" and response.json()["model_version"] == "1"
    # A version the path names and the model lacks: 404 before the body is read.
    response = httpx.post(f"{base}/v2/models/tiny/versions/2/infer", json=request)
    assert response.status_code == 404
    conflict = httpx.post(
        f"{base}/v2/models/tiny/versions/1/infer", json={**request, "model_version": "2"}
    )
    assert conflict.status_code == 400
    assert "\"model_version\" is '2' in the body but '1' in the path" in conflict.json()["error"]


def test_unknown_model_or_version_is_404(base: str) -> None:
    body = {"inputs": [tensor(X, data=X.reshape(-1).tolist())]}
    for path in ("/v2/models/nope/infer", "/v2/models/tiny/versions/2/infer"):
        response = httpx.post(base + path, json=body)
        assert response.status_code == 404 and list(response.json()) == ["error"]


def test_v2_and_predict_requests_share_batches(v2_store: Path) -> None:
    rng = np.random.default_rng(5)
    inputs = [samples(int(rng.integers(1, 4)), seed=200 + i) for i in range(64)]

    def post(client: httpx.AsyncClient, i: int, x: np.ndarray) -> Any:
        if i % 3 == 0:
            return client.post("/predict", json={"inputs": x.tolist()})
        if i % 3 == 1:
            return client.post(INFER, json={"inputs": [tensor(x, data=x.tolist())]})
        header = {
            "inputs": [tensor(x, parameters={"binary_data_size": x.nbytes})],
            "parameters": {"binary_data_output": True},
        }
        content, headers = binary_body(header, x.tobytes())
        return client.post(INFER, content=content, headers=headers)

    async def send_all(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=128)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            return await asyncio.gather(*(post(client, i, x) for i, x in enumerate(inputs)))

    settings = Settings(
        model_store=v2_store, default_model="tiny", adaptive_delay=False, max_delay_ms=20.0
    )
    with serve(create_app(settings)) as url:
        responses = asyncio.run(send_all(url))
        batches = metric_samples(url, "foldserve_batch_size")
    for i, (x, response) in enumerate(zip(inputs, responses, strict=True)):
        if i % 3 == 0:
            assert response.status_code == 200, response.text
            got = np.asarray(response.json()["outputs"], dtype=np.float32)
        else:
            got = json_answer(response) if i % 3 == 1 else binary_answer(response)[1]
        np.testing.assert_allclose(got, reference(v2_store, x), rtol=0, atol=1e-5)
    key = "{model=tiny,version=1}"
    assert batches[f"foldserve_batch_size_sum{key}"] == sum(len(x) for x in inputs)
    assert batches[f"foldserve_batch_size_count{key}"] < len(inputs)
