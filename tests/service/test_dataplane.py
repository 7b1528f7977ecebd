"""The request path without a socket: validation of a request's array against the model's input
spec, timeouts, versions named in the body, and what is counted."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from service.app import Service, create_app
from service.backends.onnx import OnnxBackend
from service.dataplane import validate_rows
from service.errors import InvalidInput
from service.finite import check_finite_outputs
from service.http.response import Response
from service.routes.predict import PredictCodec
from service.settings import Settings
from service.store import TensorSpec
from tests.service.conftest import Artifacts, add_version, http_request, reference, sample_value

SPEC = TensorSpec(name="x", shape=(2, 3))


@pytest.mark.parametrize(
    "rows",
    [
        np.zeros((4, 2, 3)),  # nested, float64: cast
        np.zeros((4, 6)),  # flat
        np.zeros((1, 2, 3), dtype=np.int64),  # integers are numbers too
        np.zeros((2, 2, 3), dtype=np.float32),
    ],
)
def test_valid_rows_come_back_float32_in_the_model_shape(rows: np.ndarray) -> None:
    valid = validate_rows(rows, SPEC)
    assert valid.dtype == np.float32 and valid.shape == (len(rows), 2, 3)


def test_float32_rows_in_the_right_shape_are_not_copied() -> None:
    rows = np.ones((3, 2, 3), dtype=np.float32)
    assert validate_rows(rows, SPEC) is rows


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            np.zeros((4, 3, 2)),
            r"expected samples shaped \(n, 2, 3\) or flat \(n, 6\), got \(4, 3, 2\)",
        ),
        (np.zeros((4, 5)), r"got \(4, 5\)"),
        (np.zeros(6), r"got \(6,\)"),  # one flat sample not wrapped in a list
        (np.zeros((0, 6)), "no samples"),
        (np.asarray(1.0), "no samples"),
        (np.full((1, 6), np.nan), "non-finite"),
        (np.full((1, 6), np.inf), "non-finite"),
        (np.full((1, 6), 1e39), "non-finite"),  # finite in float64, infinite in float32
        (np.asarray([["1"] * 6]), "numbers only .got strings"),
        (np.asarray([[None] * 6]), "numbers only .got mixed or missing values"),
        (np.ones((1, 6), dtype=bool), "numbers only .got booleans"),
    ],
)
def test_invalid_rows_are_refused_naming_the_problem(rows: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validate_rows(rows, SPEC)


def _app(store: Path, **overrides: object) -> Service:
    return create_app(Settings(model_store=store, default_model="tiny", **overrides))


def _predict(x: np.ndarray, **extra: object) -> bytes:
    return orjson.dumps({"inputs": x.tolist(), **extra})


def test_a_slow_inference_times_out_and_is_counted(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = OnnxBackend.run
    slow_now = threading.Event()  # verification at load runs at full speed first

    def run(self: OnnxBackend, batch: np.ndarray) -> np.ndarray:
        if slow_now.is_set():
            time.sleep(0.3)
        return real_run(self, batch)

    monkeypatch.setattr(OnnxBackend, "run", run)
    # A model run inline on the loop cannot be timed out mid-run: this one runs in a thread.
    app = _app(store, request_timeout_s=0.05, inline_max_ms=0.0)

    async def main() -> Response:
        await app.registry.load_all()
        slow_now.set()
        try:
            return await app.handle(http_request("/predict", _predict(np.zeros((1, 16)))))
        finally:
            await app.registry.stop()

    response = asyncio.run(main())
    assert response.status == 504 and b"request_timeout_s" in response.body
    labels = {"model": "tiny", "version": "1", "code": "504"}
    assert sample_value(app, "foldserve_requests_total", labels) == 1


def test_outputs_that_are_not_finite_are_refused_naming_the_samples() -> None:
    outputs = np.zeros((4, 3), dtype=np.float32)
    check_finite_outputs(outputs)  # finite: nothing to say
    outputs[1, 0], outputs[3, 2] = np.nan, -np.inf
    with pytest.raises(InvalidInput, match=r"outputs are not finite .* for samples 1, 3;"):
        check_finite_outputs(outputs)


def test_integers_of_any_size_are_finite_in_float32() -> None:
    rows = np.full((1, 6), np.iinfo(np.int64).max, dtype=np.int64)
    valid = validate_rows(rows, SPEC)
    assert valid.dtype == np.float32 and np.isfinite(valid).all()


def test_float64_values_that_round_to_a_finite_float32_are_accepted() -> None:
    largest = np.full((1, 2, 3), 3.4028235e38)  # float32's max as numpy prints it: above the max
    assert np.isfinite(validate_rows(largest, SPEC)).all()
    beyond = np.full((1, 2, 3), 2.0**128 - 2.0**103)  # the first value that rounds to infinity
    with pytest.raises(InvalidInput, match="non-finite"):
        validate_rows(beyond, SPEC)


@pytest.mark.parametrize(
    "rows",
    [
        np.full((1, 2, 3), 3e38),  # each fits float32; their squares' sum passes its limit
        np.full((1, 2, 3), 3e38, dtype=np.float32),
        np.full((1, 2, 3), 1e20, dtype=np.float32),  # squares past float32's range
        np.full((1, 2, 3), 6e4, dtype=np.float16),  # squares past float16's range
    ],
)
def test_large_finite_values_are_accepted_whatever_their_squares(rows: np.ndarray) -> None:
    valid = validate_rows(rows, SPEC)
    np.testing.assert_array_equal(valid, rows.astype(np.float32))


@pytest.mark.parametrize(
    "values",
    [
        [np.inf, -np.inf, 0, 0, 0, 0],  # opposite infinities: no sum may cancel them
        [np.nan, 1, 1, 1, 1, 1],
        [3e38, 3e38, 3e38, -np.inf, 0, 0],
    ],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_every_non_finite_value_is_refused_whatever_else_the_sample_holds(
    values: list[float], dtype: type[np.floating[Any]]
) -> None:
    with np.errstate(over="ignore"):  # 3e38 is infinite in float16 already
        rows = np.asarray([values], dtype=dtype)
    with pytest.raises(InvalidInput, match="non-finite"):
        validate_rows(rows, SPEC)
    with pytest.raises(InvalidInput, match="not finite"):
        check_finite_outputs(rows.astype(np.float32))


def _batches(app: Service) -> tuple[float | None, float | None]:
    labels = {"model": "tiny", "version": "1"}
    return (
        sample_value(app, "foldserve_batch_size_count", labels),
        sample_value(app, "foldserve_batch_size_sum", labels),
    )


def test_a_request_that_fills_a_batch_alone_equals_onnxruntime_and_is_counted(
    store: Path,
) -> None:
    """The whole request path without a socket: a batch of 4 rows, run inline."""
    app = _app(store, max_batch_size=4, inline_max_ms=50)
    x = np.random.default_rng(0).normal(size=(4, 2, 8)).astype(np.float32)

    async def main() -> Response:
        await app.registry.load_all()
        try:
            return await app.handle(http_request("/predict", _predict(x)))
        finally:
            await app.registry.stop()

    response = asyncio.run(main())
    assert response.status == 200, response.body
    outputs = np.asarray(orjson.loads(response.body)["outputs"])
    np.testing.assert_allclose(outputs, reference(store, x), rtol=0, atol=1e-6)
    assert _batches(app) == (1, 4)  # one backend run of 4 rows


def test_a_failure_to_encode_the_answer_is_counted_as_the_500_it_becomes(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _app(store, max_batch_size=4, inline_max_ms=50)

    def unencodable(*args: object) -> Response:
        raise TypeError("cannot encode")

    monkeypatch.setattr(PredictCodec, "encode", unencodable)

    async def main() -> None:
        await app.registry.load_all()
        try:
            with pytest.raises(TypeError, match="cannot encode"):
                await app.handle(http_request("/predict", _predict(np.zeros((1, 16)))))
        finally:
            await app.registry.stop()

    asyncio.run(main())
    labels = {"model": "tiny", "version": "1"}
    assert sample_value(app, "foldserve_requests_total", {**labels, "code": "500"}) == 1
    assert sample_value(app, "foldserve_requests_total", {**labels, "code": "200"}) is None


def test_a_body_naming_another_version_runs_there_and_agrees_with_the_path(
    store: Path, artifacts: Artifacts
) -> None:
    add_version(store, artifacts)  # tiny v2
    app = _app(store, inline_max_ms=50)
    x = np.zeros((1, 16))

    async def main() -> list[Response]:
        await app.registry.load_all()
        try:
            return [
                await app.handle(http_request("/predict", _predict(x, version=1))),
                await app.handle(http_request("/predict", _predict(x))),
                await app.handle(
                    http_request("/models/tiny/versions/2/predict", _predict(x, version=1))
                ),
            ]
        finally:
            await app.registry.stop()

    named, latest, conflict = asyncio.run(main())
    assert orjson.loads(named.body)["version"] == 1
    assert orjson.loads(latest.body)["version"] == 2
    assert conflict.status == 400 and b"in the body but 2 in the path" in conflict.body
