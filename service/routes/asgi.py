"""Raw ASGI helpers for the routes served ahead of FastAPI: read a bounded body, send an answer.

NOTE: the inference routes (``/predict``, KServe V2 ``infer``) skip FastAPI's per-request
machinery, which costs more than a small model (see docs/performance.md); they render their
errors here exactly as the framework's single error handler does: ``{"error": message}``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from starlette.types import Receive, Scope, Send

from service.errors import ClientDisconnected, FoldserveError, Overloaded, PayloadTooLarge
from service.routes.content import Decoder
from service.routes.responses import error_body, unexpected
from service.settings import setting_ref

log = logging.getLogger(__name__)

Headers = Sequence[tuple[bytes, bytes]]
JSON = b"application/json"
_MAX_COUNT_DIGITS = 18  # a byte count below 10^18: beyond any body, and cheap to convert


class RawRoutes(Protocol):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve the request if it is one of ours; ``False`` leaves it to the framework."""
        ...


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header; ``name`` in lower case, as ASGI gives them."""
    for key, value in scope["headers"]:
        if key == name:
            value_: bytes = value
            return value_
    return None


def byte_count(value: bytes) -> int | None:
    """A header's decimal byte count; None unless it is ASCII digits, at most 18 of them.

    NOTE: bounded before ``int()``: Python refuses more than 4,300 digits with a ValueError.
    """
    if not value.isdigit():  # bytes.isdigit: ASCII digits only, and at least one
        return None
    digits = value.lstrip(b"0")
    return int(digits or b"0") if len(digits) <= _MAX_COUNT_DIGITS else None


async def read_body(
    scope: Scope, receive: Receive, limit: int, decoder: Decoder | None = None
) -> bytes:
    """The whole request body, decoded; 413 as soon as it is known to exceed ``limit`` bytes,
    as received or (with a ``decoder``) decoded."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit():  # uvicorn refuses any other Content-Length
        length = byte_count(declared)  # None: more than 18 digits
        if length is None:
            shown = f"a {len(declared)}-digit number of bytes"
            raise PayloadTooLarge(f"request body of {shown} exceeds {_body_limit(limit)}")
        if length > limit:
            shown = _megabytes(length)
            raise PayloadTooLarge(f"request body of {shown} exceeds {_body_limit(limit)}")
    chunks: list[bytes] = []
    received = size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client disconnected before sending the whole body")
        chunk: bytes = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            # Sent without a length (chunked): what arrived so far is all that is known.
            raise PayloadTooLarge(
                f"request body exceeds {_body_limit(limit)} ({_megabytes(received)} received)"
            )
        if decoder is not None:
            chunk = decoder.decode(chunk, limit - size + 1)
            if size + len(chunk) > limit:
                raise PayloadTooLarge(
                    f"request body exceeds {_body_limit(limit)} once decoded "
                    f"({decoder.encoding}; {_megabytes(received)} received)"
                )
        size += len(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False):
            if decoder is not None:
                decoder.finish()
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _body_limit(limit: int) -> str:
    return setting_ref("max_body_bytes", limit, _megabytes(limit) if limit >= 100_000 else "")


def _megabytes(size: int) -> str:
    """Bytes as a person reads them: 41.2 MB (10^6 bytes; exact counts stay in the setting)."""
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


async def respond(
    send: Send, status: int, body: bytes, headers: Headers = (), content_type: bytes = JSON
) -> None:
    start = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*start, *headers]})
    await send({"type": "http.response.body", "body": body})


async def method_not_allowed(send: Send, method: str) -> None:
    message = f"method {method} not allowed here: use POST"
    await respond(send, 405, error_body(message), [(b"allow", b"POST")])


async def respond_error(send: Send, exc: Exception, route: str) -> None:
    """Render any exception as ``{"error": ...}``: a bug costs one request a 500, not the server."""
    if isinstance(exc, FoldserveError):
        # Refusals under overload are summarized by the dataplane's ShedLog, not one line each.
        if exc.status >= 500 and not isinstance(exc, Overloaded):
            log.warning("%s (%d): %s", type(exc).__name__, exc.status, exc.logged())
        extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
        await respond(send, exc.status, error_body(exc.message), extra)
        return
    await respond(send, 500, error_body(unexpected(exc, route)))
