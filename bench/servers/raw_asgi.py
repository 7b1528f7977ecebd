"""Raw ASGI + onnxruntime, no batching: the floor of a model server without a framework.

A plain ASGI callable on the same uvicorn: read the body, ``orjson.loads``, ``np.asarray`` to
float32, ``session.run`` inline on the event loop (one request, one run), and answer with
foldserve's body (outputs and predictions) through orjson. No validation beyond the reshape, no
batching, no metrics, no error bodies to speak of: what any server must at least do per request.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn

from servers.common import MODELS, manifest, onnx_path, uvicorn_options

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = [(b"content-type", b"application/json")]


class Model:
    def __init__(self, name: str) -> None:
        m = manifest(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # as foldserve: one thread per session
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(onnx_path(name)), options, providers=["CPUExecutionProvider"]
        )
        self.name, self.shape, self.labels = name, tuple(m["inputs"][0]["shape"]), m["labels"]
        self.input = self.session.get_inputs()[0].name

    def answer(self, body: bytes) -> bytes:
        x = np.asarray(orjson.loads(body)["inputs"], dtype=np.float32)
        out = self.session.run(None, {self.input: x.reshape(len(x), *self.shape)})[0]
        best = out.argmax(axis=1).tolist()
        return orjson.dumps(
            {
                "model": self.name,
                "version": 1,
                "outputs": out,
                "predictions": [self.labels[i] for i in best],
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )


def create_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    models = {name: Model(name) for name in MODELS}
    routes = {f"/models/{name}/predict": model for name, model in models.items()}
    routes["/predict"] = models["digits-mlp"]

    async def respond(send: Send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": JSON})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "GET" and scope["path"] == "/readyz":
            return await respond(send, 200, b"{}")
        model = routes.get(scope["path"]) if scope["method"] == "POST" else None
        if model is None:
            return await respond(send, 404, b'{"error":"not found"}')
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        try:
            await respond(send, 200, model.answer(b"".join(chunks)))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            await respond(send, 400, orjson.dumps({"error": str(exc)}))

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvicorn.run(create_app(), **uvicorn_options(parser.parse_args().port))
