"""One connection driven by hand, without sockets: what happens within a single read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.app import create_app
from service.http.connection import Connection
from service.server import http_server
from service.settings import Settings
from tests.service.test_http_limits import ONE, answers, post


class Transport:
    """The part of a transport a connection uses; records what is written."""

    def __init__(self) -> None:
        self.written = b""
        self.vectored = 0  # writes of several buffers at once
        self.reading = True
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: Any) -> None:
        self.vectored += 1
        for part in parts:
            self.written += bytes(part)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    abort = close


async def written(transport: Transport, turns: int = 10) -> None:
    """Wait a few turns of the loop for an answer to be written."""
    for _ in range(turns):
        if transport.written:
            return
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def connected(store: Path) -> AsyncIterator[tuple[Connection, Transport]]:
    """One connection of the production server to the tiny model's app, loaded; lost and
    stopped on the way out."""
    settings = Settings(model_store=store, default_model="tiny")
    app = create_app(settings)
    await app.registry.load_all()
    try:
        connection = Connection(http_server(app, settings))
        transport = Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        yield connection, transport
        connection.connection_lost(None)
    finally:
        await app.registry.stop()


def test_a_request_read_whole_is_answered_within_that_read(store: Path) -> None:
    """Head and body in one read: the request starts once the read is parsed through, finds its
    body there, and is answered before the read's callback returns (no task, no turn of the
    loop); the connection keeps reading for the next one."""

    async def main() -> None:
        async with connected(store) as (connection, transport):
            for _ in range(3):
                transport.written = b""
                connection.data_received(post("/predict", ONE))
                (answer,) = answers(transport.written)  # written already, in this call
                assert answer[0] == 200, answer
                assert len(orjson.loads(answer[2])["predictions"]) == 1
                assert transport.reading and not transport.closed
                await asyncio.sleep(0)  # the next request in a later turn, as a client's would
            # A head whose body is still on its way: the request waits for it, reading on.
            transport.written = b""
            whole = post("/predict", ONE)
            connection.data_received(whole[:-5])
            assert transport.written == b"" and transport.reading
            connection.data_received(whole[-5:])
            await written(transport)
            assert answers(transport.written)[0][0] == 200

    asyncio.run(main())


def test_a_binary_output_is_written_after_its_header_without_a_copy(store: Path) -> None:
    """A V2 answer with a binary output goes out as two buffers in one vectored write (the
    tensor's bytes are not joined to the header), and reads back as the JSON answer's numbers
    with a Content-Length that counts both."""
    x = np.linspace(-1, 1, 3 * 16, dtype="<f4").reshape(3, 16)
    tensor = {"name": "x", "shape": [3, 2, 8], "datatype": "FP32"}

    async def main() -> None:
        async with connected(store) as (connection, transport):
            json_body = orjson.dumps({"inputs": [{**tensor, "data": x.reshape(-1).tolist()}]})
            connection.data_received(post("/v2/models/tiny/infer", json_body))
            ((status, _, text),) = answers(transport.written)
            assert status == 200 and transport.vectored == 0, text
            want = np.asarray(orjson.loads(text)["outputs"][0]["data"], dtype="<f4")

            transport.written = b""
            header = orjson.dumps(
                {
                    "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                    "parameters": {"binary_data_output": True},
                }
            )
            connection.data_received(
                post(
                    "/v2/models/tiny/infer",
                    header + x.tobytes(),
                    f"Inference-Header-Content-Length: {len(header)}",
                )
            )
            await written(transport)
            ((status, headers, body),) = answers(transport.written)
            assert status == 200 and transport.vectored == 1, body
            cut = int(headers["inference-header-content-length"])
            meta = orjson.loads(body[:cut])["outputs"][0]
            assert meta["parameters"]["binary_data_size"] == len(body) - cut == want.nbytes
            assert np.array_equal(np.frombuffer(body[cut:], dtype="<f4"), want)

    asyncio.run(main())
