"""End to end, when things go wrong: bad models stay out, bad requests fail alone."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import service.loader as loader_module
from service import verify
from service.app import create_app
from service.backends.onnx import OnnxBackend
from service.routes import predict
from service.store import version_dir
from tests.service.conftest import Artifacts, add_version, reference, serve, until_loaded
from tests.service.test_app_e2e import metric_samples, outputs, samples, settings

POISON = 1234.5  # a batch holding this value makes the patched backend raise


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


async def gather_posts(
    base: str, requests: list[tuple[str, dict[str, Any]]]
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        return await asyncio.gather(*(client.post(path, **kw) for path, kw in requests))


@pytest.fixture
def poisoned_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = OnnxBackend.run

    def run(self: OnnxBackend, batch: np.ndarray) -> np.ndarray:
        if (batch == POISON).any():
            raise RuntimeError("injected failure")
        return real_run(self, batch)

    monkeypatch.setattr(OnnxBackend, "run", run)


@pytest.fixture
def slow_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_run = OnnxBackend.run

    def run(self: OnnxBackend, batch: np.ndarray) -> np.ndarray:
        time.sleep(0.05)
        return real_run(self, batch)

    monkeypatch.setattr(OnnxBackend, "run", run)
    yield


def test_corrupted_file_keeps_the_model_out_and_readiness_says_why(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    root = tmp_path / "store"
    add_version(root, artifacts)
    add_version(root, artifacts, name="other")
    path = version_dir(root, "tiny", 1) / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with serve(create_app(settings(root))) as base:
        ready = httpx.get(f"{base}/readyz")
        listed = {m["name"]: m["versions"][0] for m in httpx.get(f"{base}/models").json()["models"]}
        default = httpx.post(f"{base}/predict", json={"inputs": samples(1, seed=0).tolist()})
        other = httpx.post(f"{base}/models/other/predict", json={"inputs": samples(1, 0).tolist()})
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert "sha256" in ready.json()["reason"]
    assert listed["tiny"]["status"] == "failed" and "sha256" in listed["tiny"]["reason"]
    assert listed["other"]["status"] == "ready"  # one model's failure never stops the others
    assert "sha256" in error(default, 503)
    assert other.status_code == 200


def test_wrong_golden_output_keeps_the_model_out(tmp_path: Path, artifacts: Artifacts) -> None:
    root = tmp_path / "store"
    add_version(root, artifacts, golden_shift=0.5)
    with serve(create_app(settings(root))) as base:
        ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 503
    assert "golden outputs differ" in ready.json()["reason"]
    assert ready.json()["models"][0]["status"] == "failed"


BAD_REQUESTS: list[tuple[str, dict[str, Any], int]] = [
    ("/predict", {"json": {"inputs": [[1.0, 2.0, 3.0]]}}, 400),  # wrong shape
    ("/predict", {"json": {"inputs": [[1e39] * 16]}}, 400),  # beyond float32: infinite
    ("/predict", {"content": b'{"inputs": [[NaN' + b", 0" * 15 + b"]]}"}, 400),
    ("/predict", {"json": {"inputs": [["a"] * 16]}}, 400),  # not numbers
    ("/predict", {"json": {"inputs": [[None] * 16]}}, 400),
    ("/predict", {"json": {"inputs": [[1.0] * 16, [1.0] * 15]}}, 400),  # ragged
    ("/predict", {"json": {"inputs": []}}, 400),
    ("/predict", {"json": {"model": "tiny"}}, 400),  # missing inputs
    ("/predict", {"json": {"inputs": [[0.0] * 16], "version": True}}, 400),
    ("/predict", {"content": b"not json"}, 400),
    ("/predict", {"json": [1, 2]}, 400),
    ("/models/nope/predict", {"json": {"inputs": [[0.0] * 16]}}, 404),
    ("/models/tiny/versions/9/predict", {"json": {"inputs": [[0.0] * 16]}}, 404),
    ("/models/tiny/versions/x/predict", {"json": {"inputs": [[0.0] * 16]}}, 400),
    ("/nowhere", {"json": {}}, 404),
]


def test_bad_requests_fail_alone_with_json_errors(store: Path) -> None:
    good = [samples(2, seed=200 + i) for i in range(30)]
    requests = [(path, kw) for path, kw, _ in BAD_REQUESTS]
    requests += [("/predict", {"json": {"inputs": x.tolist()}}) for x in good]
    with serve(create_app(settings(store, max_delay_ms=20.0))) as base:
        responses = asyncio.run(gather_posts(base, requests))
    for (path, _, status), response in zip(BAD_REQUESTS, responses, strict=False):
        assert error(response, status), path
    shape_error = error(responses[0], 400)
    assert "(n, 2, 8)" in shape_error and "(1, 3)" in shape_error
    for x, response in zip(good, responses[len(BAD_REQUESTS) :], strict=True):
        np.testing.assert_allclose(outputs(response), reference(store, x), rtol=0, atol=1e-5)


@pytest.mark.usefixtures("poisoned_backend")
def test_a_failing_backend_fails_only_the_request_that_breaks_it(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    poison = np.full((1, 2, 8), POISON, dtype=np.float32)
    good = [samples(1, seed=300 + i) for i in range(12)]
    batch = [*good[:6], poison, *good[6:]]
    # One batch for all 13: the cap is their row count and the deadline is far off.
    config = settings(store, max_batch_size=len(batch), max_delay_ms=2000.0)
    # Requests sent on their own fill the cap too, so none of them waits for the deadline.
    poisoned_alone = np.concatenate(batch)
    good_alone = np.concatenate(good + good[:1])
    with serve(create_app(config)) as base:
        alone = httpx.post(f"{base}/predict", json={"inputs": poisoned_alone.tolist()})
        mixed = asyncio.run(
            gather_posts(base, [("/predict", {"json": {"inputs": x.tolist()}}) for x in batch])
        )
        after = httpx.post(f"{base}/predict", json={"inputs": good_alone.tolist()})
        batches = metric_samples(base, "foldserve_batch_size")
    # The runtime's own words (paths, internals) go to the log, never to the client.
    for failed in (alone, mixed[6]):
        assert error(failed, 500) == "inference failed in the model's runtime: see the server log"
    assert "RuntimeError: injected failure" in caplog.text
    for x, response in zip(good, mixed[:6] + mixed[7:], strict=True):
        # Innocent batch mates of the poison get their own answers, not its error.
        np.testing.assert_allclose(outputs(response), reference(store, x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(outputs(after), reference(store, good_alone), rtol=0, atol=1e-5)
    # They did share a batch: one run held all 13 rows (the failed one, before the re-runs).
    assert (
        batches["foldserve_batch_size_bucket{le=8.0,model=tiny,version=1}"]
        < batches["foldserve_batch_size_count{model=tiny,version=1}"]
    )


def test_an_input_the_model_overflows_on_is_refused_alone(store: Path) -> None:
    huge = np.full((1, 2, 8), 3e38, dtype=np.float32)  # finite, but the model's sums overflow
    good = [samples(2, seed=400 + i) for i in range(7)]
    batch = [*good[:3], huge, *good[3:]]
    rows = sum(len(x) for x in batch)
    config = settings(store, max_batch_size=rows, max_delay_ms=2000.0)
    with serve(create_app(config)) as base:
        responses = asyncio.run(
            gather_posts(base, [("/predict", {"json": {"inputs": x.tolist()}}) for x in batch])
        )
        batches = metric_samples(base, "foldserve_batch_size")
        requests = metric_samples(base, "foldserve_requests_total")
    assert not np.isfinite(reference(store, huge)).all()  # the premise: NaN/inf comes out
    message = error(responses[3], 400)
    assert "outside the range the model can compute: outputs are not finite" in message
    for x, response in zip(good, responses[:3] + responses[4:], strict=True):
        np.testing.assert_allclose(outputs(response), reference(store, x), rtol=0, atol=1e-5)
    key = "{model=tiny,version=1}"
    assert batches[f"foldserve_batch_size_count{key}"] == 1  # all of them in one batch
    assert batches[f"foldserve_batch_size_sum{key}"] == rows
    assert requests["foldserve_requests_total{code=400,model=tiny,version=1}"] == 1


@pytest.mark.usefixtures("slow_backend")
def test_overload_answers_what_fits_its_deadline_and_refuses_the_rest_with_retry_after(
    store: Path,
) -> None:
    """40 requests at once, a queue of 4 rows, 50 ms a batch of 2: all 40 take a second."""
    config = settings(store, max_queue_rows=4, max_batch_size=2, max_delay_ms=0.0)
    inputs = [samples(1, seed=i) for i in range(40)]
    with serve(create_app(config)) as base:
        patient = asyncio.run(
            gather_posts(base, [("/predict", {"json": {"inputs": x.tolist()}}) for x in inputs])
        )
        hurried = asyncio.run(
            gather_posts(
                base,
                [
                    (
                        "/predict",
                        {"json": {"inputs": x.tolist()}, "headers": {"X-Request-Timeout": "0.3"}},
                    )
                    for x in inputs
                ],
            )
        )
    # Without a deadline of their own (30 s, request_timeout_s), all of them wait their turn
    # at the gate, unread, and are answered: nothing is refused that can be answered in time.
    for x, response in zip(inputs, patient, strict=True):
        np.testing.assert_allclose(outputs(response), reference(store, x), rtol=0, atol=1e-5)
    # With 0.3 s, about a third can be; the others are refused at once.
    answered = [r for r in hurried if r.status_code == 200]
    refused = [r for r in hurried if r.status_code == 503]
    late = [r for r in hurried if r.status_code == 504]
    assert answered and refused and len(answered) + len(refused) + len(late) == len(inputs)
    # A 504 is an admitted request whose estimate was wrong (a batch ran slower than measured).
    assert len(late) <= 3, [r.status_code for r in hurried]
    assert all(r.headers["retry-after"] == "1" and "deadline" in error(r, 503) for r in refused)


def test_bodies_over_the_limit_get_413(store: Path) -> None:
    big = {"inputs": samples(40, seed=0).tolist()}  # several kB

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"inputs": ['
        yield b",".join([b"[" + b",".join([b"0.5"] * 16) + b"]"] * 100)
        yield b"]}"

    with serve(create_app(settings(store, max_body_bytes=1024))) as base:
        declared = httpx.post(f"{base}/predict", json=big)
        streamed = httpx.post(f"{base}/predict", content=chunks())
        small = httpx.post(f"{base}/predict", json={"inputs": samples(1, seed=0).tolist()})
    limit = "exceeds max_body_bytes (FOLDSERVE_MAX_BODY_BYTES=1024)"
    sent = declared.request.headers["content-length"]
    assert f"request body of {sent} bytes {limit}" in error(declared, 413)
    assert limit in error(streamed, 413)
    assert small.status_code == 200


def test_an_unexpected_error_is_a_json_500_and_serving_goes_on(
    store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    with serve(create_app(settings(store))) as base:
        monkeypatch.setattr(predict, "predictions", broken)
        failed = httpx.post(f"{base}/predict", json={"inputs": samples(1, seed=0).tolist()})
        monkeypatch.undo()
        after = httpx.post(f"{base}/predict", json={"inputs": samples(1, seed=0).tolist()})
    message = error(failed, 500)
    assert re.fullmatch(r"internal error [0-9a-f]{8}: see the server log", message)
    (logged,) = [
        r for r in caplog.records if r.exc_info and message.split()[2].rstrip(":") in r.getMessage()
    ]
    assert "a bug" in str(logged.exc_info[1])  # the log has it, under the id the client got
    assert "RuntimeError" not in message and "a bug" not in message
    assert after.status_code == 200


def test_liveness_answers_while_models_load_and_readiness_waits(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_verify = verify.verify_loaded_model

    def held(*args: Any) -> Any:
        assert release.wait(10)
        return real_verify(*args)

    monkeypatch.setattr(loader_module, "verify_loaded_model", held)
    with serve(create_app(settings(store)), wait_loaded=False) as base:
        live = httpx.get(f"{base}/healthz")
        loading = httpx.get(f"{base}/readyz")
        early = httpx.post(f"{base}/predict", json={"inputs": samples(1, seed=0).tolist()})
        release.set()
        until_loaded(base)
        ready = httpx.get(f"{base}/readyz")
    assert live.status_code == 200
    assert loading.status_code == 503 and "v1 loading" in loading.json()["reason"]
    # A request for a model still loading: 503 with Retry-After, so that a client retries.
    assert early.status_code == 503 and early.headers["retry-after"] == "1"
    assert "v1 loading" in early.json()["error"]
    assert ready.status_code == 200


def test_inference_paths_answer_other_methods_with_405(store: Path) -> None:
    with serve(create_app(settings(store))) as base:
        for method, path in [
            ("GET", "/predict"),
            ("PUT", "/models/tiny/predict"),
            ("GET", "/models/tiny/versions/1/predict"),
            ("GET", "/v2/models/tiny/infer"),
        ]:
            response = httpx.request(method, f"{base}{path}")
            assert response.status_code == 405, (method, path)
            assert response.headers["allow"] == "POST"
            assert "use POST" in response.json()["error"]
        after = httpx.post(f"{base}/predict", json={"inputs": samples(1, seed=0).tolist()})
    assert after.status_code == 200
