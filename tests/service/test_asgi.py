"""The raw ASGI helpers and inference routes, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from service.dataplane import DataPlane
from service.errors import ClientDisconnected, PayloadTooLarge
from service.metrics import Metrics
from service.registry import Registry
from service.routes.asgi import RawRoutes, read_body
from service.routes.predict import PredictRoutes
from service.settings import Settings
from tests.service.conftest import reference


def receiver(*messages: dict[str, Any]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


def test_a_chunked_body_is_joined() -> None:
    receive = receiver(
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.request", "body": b"1}", "more_body": False},
    )
    assert asyncio.run(read_body({"headers": []}, receive, 100)) == b'{"a":1}'


def test_a_client_gone_mid_body_is_a_499_not_a_bad_request() -> None:
    receive = receiver(
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.disconnect"},
    )
    with pytest.raises(ClientDisconnected) as caught:
        asyncio.run(read_body({"headers": []}, receive, 100))
    assert caught.value.status == 499


def test_a_body_over_the_limit_is_refused_as_it_arrives() -> None:
    receive = receiver(
        {"type": "http.request", "body": b"x" * 60, "more_body": True},
        {"type": "http.request", "body": b"x" * 60, "more_body": False},
    )
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body({"headers": []}, receive, 100))


async def _post(routes: RawRoutes, path: str, body: bytes) -> tuple[int, bytes]:
    """One POST through a raw route: the status and the whole answer's body."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    assert await routes.handle(scope, receiver({"type": "http.request", "body": body}), send)
    return sent[0]["status"], sent[1]["body"]


def test_predict_answers_a_full_batch_as_onnxruntime_and_refuses_ragged_rows(store: Path) -> None:
    # The manifest's cap is 64 rows and the tiny model runs inline: a full batch runs at once.
    config = Settings(model_store=store, default_model="tiny", inline_max_ms=50.0)
    metrics = Metrics(CollectorRegistry())
    registry = Registry(config, metrics)
    routes = PredictRoutes(DataPlane(registry, metrics), config.max_body_bytes)
    x = np.random.default_rng(0).normal(size=(64, 16))

    async def main() -> list[tuple[int, bytes]]:
        await registry.load_all()
        try:
            full = orjson.dumps({"inputs": x.tolist()})
            ragged = orjson.dumps({"inputs": [[1.0] * 16, [1.0] * 15]})
            return [await _post(routes, "/predict", body) for body in (full, ragged)]
        finally:
            await registry.stop()

    (status, body), (ragged_status, ragged_body) = asyncio.run(main())
    assert status == 200
    outputs = np.asarray(orjson.loads(body)["outputs"], dtype=np.float32)
    np.testing.assert_allclose(outputs, reference(store, x), rtol=0, atol=1e-5)
    assert ragged_status == 400
    assert orjson.loads(ragged_body) == {"error": '"inputs" samples must all have the same shape'}
