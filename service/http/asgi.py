"""Run an ASGI application (the FastAPI routes: health, models, metrics, docs, the status page)
for one request, and collect its answer.

NOTE: only what those routes use: one HTTP request in, one whole response out (they answer a few
kilobytes at most). The inference routes do not come this way (service.routes.inference).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message

from service.http.request import Request
from service.http.response import Response

_SPEC = {"version": "3.0", "spec_version": "2.3"}


class AsgiBridge:
    def __init__(self, app: ASGIApp, server: tuple[str, int] | None = None) -> None:
        self.app = app
        self.server = server

    async def __call__(self, request: Request) -> Response:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _SPEC,
            "http_version": request.http_version,
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.raw_path,
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "client": request.client,
            "server": self.server,
            "state": {},
        }
        body = request.body
        answer = _Answer()

        async def receive() -> Message:
            chunk = await body.next_chunk() if not body.complete or body.buffered else None
            if chunk is not None:
                return {"type": "http.request", "body": chunk, "more_body": True}
            if not answer.body_done:
                answer.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # nothing more will come: wait to be cancelled
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            answer.take(message)

        await self.app(scope, receive, send)
        return answer.response()


class _Answer:
    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type: bytes | None = None
        self.parts: list[bytes] = []
        self.started = False
        self.body_done = False

    def take(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            for name, value in message.get("headers", ()):
                name = bytes(name).lower()
                if name == b"content-type":
                    self.content_type = bytes(value)
                elif name != b"content-length":  # the server counts the body itself
                    self.headers.append((name, bytes(value)))
        elif message["type"] == "http.response.body":
            self.parts.append(bytes(message.get("body", b"")))

    def response(self) -> Response:
        if not self.started:
            raise RuntimeError("the application returned without answering")
        return Response(self.status, b"".join(self.parts), self.content_type, self.headers)
