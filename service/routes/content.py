"""What an inference request's body may be: its media type (Content-Type) and its encoding.

Types: JSON (``application/json``, or any ``application/*+json``; a ``charset`` other than UTF-8 is
refused, as RFC 8259 allows no other), and on V2 also ``application/octet-stream``, Triton's binary
tensor form (how its framing is read is up to ``Inference-Header-Content-Length``, not the type:
tritonclient's aiohttp client labels every body octet-stream). Every other type gets 415, among
them the three a page on another site can send without a CORS preflight (``text/plain``,
``application/x-www-form-urlencoded``, ``multipart/form-data``), so that a page a user visits
cannot make their browser run inference here. curl's ``-d`` sends the form type: say
``-H 'Content-Type: application/json'`` (or use ``--json``).

A body without a Content-Type is read as the route's default: many programmatic clients send none
(tritonclient's default client, wrk, ``requests`` and ``httpx`` with raw bytes). Unless it comes
from a browser, which adds ``Origin`` to every cross-site POST: a page can send an untyped body
(a Blob without a type) without a preflight too, so there the type is required.

Encodings: gzip and deflate (the two tritonclient can compress a request with) are decoded as the
body arrives, and ``max_body_bytes`` bounds the decoded size as well as the received one, so a
small body that inflates enormously is refused with 413 once the limit is passed; ``identity`` is
no encoding; anything else is 415 with ``Accept-Encoding`` saying what is read.
"""

from __future__ import annotations

import zlib

from starlette.types import Scope

from service.errors import InvalidInput, UnsupportedMediaType

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"
ENCODINGS = "gzip, deflate"
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
_FORM = b"application/x-www-form-urlencoded"


class Decoder:
    """Decodes a gzip or deflate body chunk by chunk, never inflating more than it is asked."""

    def __init__(self, encoding: bytes) -> None:
        self.encoding = encoding.decode()
        self._zlib = zlib.decompressobj(_WBITS[encoding])

    def decode(self, chunk: bytes, most: int) -> bytes:
        """At most ``most`` (>= 1) decoded bytes; exactly ``most`` when ``chunk`` holds more."""
        try:
            return self._zlib.decompress(chunk, most)
        except zlib.error as exc:
            raise InvalidInput(f"body is not valid {self.encoding} data: {exc}") from None

    def finish(self) -> None:
        """Refuse a stream cut short or followed by more bytes."""
        if not self._zlib.eof:
            raise InvalidInput(f"{self.encoding} body ends before its end of stream (truncated)")
        if self._zlib.unused_data:
            extra = len(self._zlib.unused_data)
            raise InvalidInput(f"{extra} bytes follow the end of the {self.encoding} stream")


def body_decoder(scope: Scope, *, binary: bool = False) -> Decoder | None:
    """Check the request's Content-Type and Content-Encoding (415); the decoder its body needs.

    ``binary``: the route also reads ``application/octet-stream`` (V2's binary tensor form).
    """
    kind = encoding = origin = None
    for key, value in scope["headers"]:  # one pass, not one per header
        if key == b"content-type":
            kind = value
        elif key == b"content-encoding":
            encoding = value
        elif key == b"origin":
            origin = value
    if kind != JSON:  # the usual value, exactly: nothing to parse
        _check_type(kind, origin, binary)
    return None if encoding is None else _decoder(encoding)


def _check_type(value: bytes | None, origin: bytes | None, binary: bool) -> None:
    send = "send JSON with 'Content-Type: application/json'"
    if binary:
        send += " (or 'application/octet-stream' with Inference-Header-Content-Length)"
    if value is None:
        if origin is None:
            return
        raise UnsupportedMediaType(
            f"a request from a web page (it carries Origin) must name its Content-Type: {send}"
        )
    kind, _, parameters = value.partition(b";")
    kind = kind.strip().lower()
    if kind == JSON or (kind.startswith(b"application/") and kind.endswith(b"+json")):
        _check_charset(parameters)
        return
    if binary and kind == OCTET_STREAM:
        return
    shown = value[:60].decode("latin-1")
    hint = " (curl -d sends that unless told: add -H 'Content-Type: application/json')"
    raise UnsupportedMediaType(
        f"Content-Type {shown!r} is not read here: {send}{hint if kind == _FORM else ''}"
    )


def _check_charset(parameters: bytes) -> None:
    for parameter in parameters.split(b";"):
        name, _, charset = parameter.partition(b"=")
        if name.strip().lower() != b"charset":
            continue
        charset = charset.strip().strip(b'"').lower()
        if charset not in (b"utf-8", b"utf8"):
            shown = charset[:30].decode("latin-1")
            raise UnsupportedMediaType(f"JSON is read as UTF-8 only, not charset {shown!r}")


def _decoder(value: bytes) -> Decoder | None:
    encoding = value.strip().lower()
    if encoding == b"identity":
        return None
    if encoding not in _WBITS:
        shown = value[:60].decode("latin-1")
        raise UnsupportedMediaType(
            f"Content-Encoding {shown!r} is not read here: send the body as is, or with "
            f"one of: {ENCODINGS}",
            accept_encoding=ENCODINGS,
        )
    return Decoder(encoding)
