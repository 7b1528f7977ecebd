"""The raw ASGI helpers of the inference routes, without a server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.errors import ClientDisconnected, PayloadTooLarge
from service.routes.asgi import read_body


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
