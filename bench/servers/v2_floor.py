"""The floor of serving one big image over HTTP: what no server in Python does with less.

uvloop and httptools, nothing else: read a KServe V2 binary request (JSON header, raw float32),
run onnxruntime on every core in one worker thread (as foldserve runs a slow model), write the
V2 binary answer in one vectored write. No checks, limits, batching, metrics, errors or second
request on the way. ``bench/load/real_models`` serves the same model file through it beside
foldserve: at one connection a request is a serial chain (read, run, write, the client's turn),
so the floor's images per second against in-process onnxruntime say how much of the machine's
speed any server keeps there, and foldserve's against the floor's what foldserve itself costs.

    python -m servers.v2_floor --model PATH --port N
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
from typing import Any

import httptools
import numpy as np
import onnxruntime as ort
import uvloop


class Model:
    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.worker = concurrent.futures.ThreadPoolExecutor(1)

    def run(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run([self.output], {self.input: x})[0]
        return out


class Connection(asyncio.Protocol):
    def __init__(self, model: Model) -> None:
        self.model = model
        self.parser = httptools.HttpRequestParser(self)
        self.body = bytearray()
        self.header_length = 0
        self.url = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self.header_length = int(value)

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_message_complete(self) -> None:
        body, self.body = bytes(self.body), bytearray()
        if self.url == b"/readyz":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        asyncio.get_running_loop().create_task(self.answer(body, self.header_length))

    async def answer(self, body: bytes, header_length: int) -> None:
        tensor = json.loads(body[:header_length])["inputs"][0]
        x = np.frombuffer(body, np.float32, offset=header_length).reshape(tensor["shape"])
        loop = asyncio.get_running_loop()
        y = await loop.run_in_executor(self.model.worker, self.model.run, x)
        head = json.dumps(
            {
                "model_name": "floor",
                "outputs": [
                    {
                        "name": self.model.output,
                        "datatype": "FP32",
                        "shape": list(y.shape),
                        "parameters": {"binary_data_size": y.nbytes},
                    }
                ],
            },
            separators=(",", ":"),
        ).encode()
        status = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
            % (len(head), len(head) + y.nbytes)
        )
        if not self.transport.is_closing():
            self.transport.writelines([status, head, memoryview(y).cast("B")])


async def serve(model: Model, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(model), "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(Model(args.model), args.port))


if __name__ == "__main__":
    main()
