"""A response as every route returns it, and the bytes it becomes on the wire.

Every answer the server writes goes through ``encode``, the routes' and the connection's own
(400 for a malformed request, 408, 413, 431, 503 past the connection limit) alike, so each one
carries ``X-Request-ID``, ``Date`` and a ``Content-Length``, and every error has the project's
body, ``{"error": message}``.
"""

from __future__ import annotations

import http
import time
from dataclasses import dataclass, field
from email.utils import formatdate

import orjson

from service.errors import FoldserveError

JSON = b"application/json"
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: bytes | None = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # names in lower case
    close: bool = False  # close the connection once this is written
    # NOTE: bytes sent after ``body`` as they are, not joined to it: a binary tensor of an
    # image-sized output (a UNet's 512 KiB) was copied three times on its way out, on the loop.
    tail: memoryview | None = None

    @property
    def length(self) -> int:
        return len(self.body) + (0 if self.tail is None else self.tail.nbytes)


async def answered(response: Response) -> Response:
    """A response already made, as the awaitable a handler returns."""
    return response


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def error_response(
    status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    return Response(status, error_body(message), JSON, headers or [])


def failure(exc: FoldserveError) -> Response:
    """A refusal as the client reads it: its status, its message, its headers (Retry-After...)."""
    extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    return error_response(exc.status, exc.message, extra)


class _Date:
    """The ``Date`` header's value, formatted once per second (RFC 9110 asks an origin server
    with a clock to send it)."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode()
        return self._value


_date = _Date()


def encode(
    response: Response, request_id: bytes, *, keep_alive: bool, head_only: bool = False
) -> bytes:
    """The status line, headers and body (not the tail: written after these bytes as it is);
    ``head_only`` (a HEAD request) leaves the body out."""
    status = response.status
    lines = [
        b"HTTP/1.1 %d %s\r\ndate: %s\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
        % (status, _REASONS.get(status, b"Unknown"), _date.now(), response.length, request_id)
    ]
    if response.content_type is not None:
        lines.append(b"content-type: %s\r\n" % response.content_type)
    for name, value in response.headers:
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
    if not head_only:
        lines.append(response.body)
    return b"".join(lines)
