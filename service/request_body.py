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
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.http.request import Head, Request
from service.settings import Settings, setting_ref

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"
IMAGE_TYPES = frozenset({b"image/png", b"image/jpeg"})
ENCODINGS = "gzip, deflate"
_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
_FORM = b"application/x-www-form-urlencoded"
# Bytes inflated at a time: a refusal (size, items) stops the inflation within one piece.
PIECE = 64 << 10
# An encoded body is refused from a projection of its items once it has shown a few thousand
# (one piece of numbers), and only when the projection passes four times the limit.
PROJECTION_FROM = 4096
PROJECTION_MARGIN = 4


class Decoder:
    """Decodes a gzip or deflate body chunk by chunk, never inflating more than it is asked."""

    def __init__(self, encoding: bytes) -> None:
        self.encoding = encoding.decode()
        self._zlib = zlib.decompressobj(_WBITS[encoding])
        self.consumed = 0  # bytes of encoded input inflated so far

    def decode(self, chunk: bytes, most: int) -> Iterator[bytes]:
        """``chunk`` decoded, in pieces of at most ``PIECE`` bytes, never more than ``most``
        (>= 1) in all: a caller refusing the body stops the inflation at the next piece."""
        data = chunk
        try:
            while most > 0:
                piece = self._zlib.decompress(data, min(most, PIECE))
                most -= len(piece)
                self.consumed += len(data) - len(self._zlib.unconsumed_tail)
                if piece:
                    yield piece
                data = self._zlib.unconsumed_tail
                if not data:
                    return
        except zlib.error as exc:
            raise InvalidInput(f"body is not valid {self.encoding} data: {exc}") from None

    def finish(self) -> None:
        """Refuse a stream cut short or followed by more bytes."""
        if not self._zlib.eof:
            raise InvalidInput(f"{self.encoding} body ends before its end of stream (truncated)")
        if self._zlib.unused_data:
            extra = len(self._zlib.unused_data)
            raise InvalidInput(f"{extra} bytes follow the end of the {self.encoding} stream")


def body_decoder(head: Head, *, binary: bool = False, images: bool = False) -> Decoder | None:
    """Check the request's Content-Type and Content-Encoding (415); the decoder its body needs.

    ``binary``: the route also reads ``application/octet-stream`` (V2's binary tensor form);
    ``images``: ``image/png`` and ``image/jpeg`` (an image model's input, as a file).
    """
    kind = head.content_type
    if kind != JSON:  # the usual value, exactly: nothing to parse
        _check_type(kind, head.origin, binary, images)
    encoding = head.content_encoding
    return None if encoding is None else _decoder(encoding)


@dataclass(frozen=True)
class BodyLimit:
    """How much body a route reads: bytes (as received, and as decoded), and for JSON the
    numbers and lists it may hold, which is what parsing it costs."""

    max_bytes: int
    bytes_setting: str  # how a message names the setting, e.g. "max_json_bytes (...=8388608)"
    max_items: int | None = None
    items_setting: str = ""


def json_limit(settings: Settings) -> BodyLimit:
    """A JSON body's bounds: max_json_bytes, or max_body_bytes where that is lower."""
    if settings.max_body_bytes < settings.max_json_bytes:
        most, named = settings.max_body_bytes, "max_body_bytes"
    else:
        most, named = settings.max_json_bytes, "max_json_bytes"
    return BodyLimit(
        most,
        setting_ref(named, most),
        settings.max_json_items,
        setting_ref("max_json_items", settings.max_json_items),
    )


class _BodyReader:
    """One body being read against its limit, chunk by chunk, whether the chunks are waited
    for (``read_body``) or all there already (``read_body_now``)."""

    __slots__ = ("_body", "_chunks", "_count_items", "_declared", "_decoder", "_items", "_limit",
                 "_size")  # fmt: skip

    def __init__(self, request: Request, limit: BodyLimit, decoder: Decoder | None) -> None:
        most = limit.max_bytes
        declared = request.head.content_length
        length = None
        if declared is not None:
            length = byte_count(declared)
            if length is None:
                raise PayloadTooLarge(
                    f"request body of a {len(declared)}-digit number of bytes exceeds "
                    f"{limit.bytes_setting}"
                )
            if length > most:
                raise PayloadTooLarge(
                    f"request body of {megabytes(length)} exceeds {limit.bytes_setting}"
                )
        self._body = request.body
        self._limit = limit
        self._decoder = decoder
        self._declared = length
        self._chunks: list[bytes] = []
        self._size = self._items = 0
        # A body that may hold more items than the limit is counted as it arrives (and
        # inflates): a zip bomb of numbers is refused after the limit's worth of them, not
        # after max_bytes.
        self._count_items = limit.max_items is not None and (
            decoder is not None or length is None or length > limit.max_items
        )

    def add(self, chunk: bytes) -> None:
        body, limit, decoder = self._body, self._limit, self._decoder
        most = limit.max_bytes
        if body.received > most:
            # Sent without a length (chunked): what arrived so far is all that is known.
            raise PayloadTooLarge(
                f"request body exceeds {limit.bytes_setting} ({megabytes(body.received)} received)"
            )
        for piece in (chunk,) if decoder is None else decoder.decode(chunk, most - self._size + 1):
            if self._size + len(piece) > most:
                assert decoder is not None  # a plain body was checked as received, above
                raise PayloadTooLarge(
                    f"request body exceeds {limit.bytes_setting} once decoded ({decoder.encoding}; "
                    f"{megabytes(body.received)} received)"
                )
            if self._count_items:
                self._items += _items(piece)
                _check_items(self._items, limit)
                if decoder is not None and self._declared:
                    _check_projected(self._items, decoder.consumed, self._declared, limit)
            body.hold(len(piece))  # 503 when bodies in flight hold all they may
            self._size += len(piece)
            self._chunks.append(piece)

    def finish(self) -> bytes:
        if self._decoder is not None:
            self._decoder.finish()
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body(request: Request, limit: BodyLimit, decoder: Decoder | None) -> bytes:
    """The whole body, decoded; 413 as soon as it is known to pass ``limit``: from its
    Content-Length before a byte is read, then as it arrives, then as it inflates; and for JSON
    from the count of its numbers and lists, before it is parsed."""
    reader = _BodyReader(request, limit, decoder)
    while (chunk := await request.body.next_chunk()) is not None:
        reader.add(chunk)
    return reader.finish()


def read_body_now(request: Request, limit: BodyLimit, decoder: Decoder | None) -> bytes | None:
    """``read_body`` without waiting, when every byte of the body has arrived already (the usual
    small request, read with its head); None when some is still on its way: await
    ``read_body`` then (no byte was taken)."""
    body = request.body
    if not body.complete:
        return None
    reader = _BodyReader(request, limit, decoder)
    for chunk in body.take_all():
        reader.add(chunk)
    return reader.finish()


def check_items(text: bytes | memoryview, limit: BodyLimit) -> None:
    """Refuse JSON holding more numbers and lists than ``limit.max_items`` before parsing it:
    its parse costs ~100 ns per item on the event loop, whatever its size in bytes.

    NOTE: in a JSON array every item but the first follows a comma, and every list opens with
    ``[``: their count bounds the items. A text of fewer bytes than the limit cannot pass it, so
    the usual small body costs nothing here.
    """
    if limit.max_items is not None and len(text) > limit.max_items:
        _check_items(_items(text), limit)


def _items(text: bytes | memoryview) -> int:
    raw = np.frombuffer(text, dtype=np.uint8)
    return int(np.count_nonzero(raw == ord(","))) + int(np.count_nonzero(raw == ord("[")))


def _check_projected(items: int, consumed: int, declared: int, limit: BodyLimit) -> None:
    """Refuse an encoded body whose first part already says the whole will hold several times
    the items allowed (its compressed length is known): a zip bomb of numbers costs its first
    pieces' inflation, not the limit's worth.

    NOTE: a JSON array of numbers compresses about evenly along its length; the margin
    (``PROJECTION_MARGIN``) and the minimum seen (``PROJECTION_FROM``) leave a body whose start
    compresses better than its rest to be counted to the end.
    """
    most = limit.max_items
    if most is None or consumed <= 0 or items < min(PROJECTION_FROM, most):
        return
    projected = items * declared // consumed
    if projected > PROJECTION_MARGIN * most:
        raise PayloadTooLarge(
            f"request JSON would hold about {projected:,} numbers and lists (its first "
            f"{consumed:,} of {declared:,} encoded bytes hold {items:,}), more than "
            f"{limit.items_setting}: send fewer rows per request, or large tensors as binary "
            "(the V2 binary tensor extension)"
        )


def _check_items(items: int, limit: BodyLimit) -> None:
    if limit.max_items is not None and items > limit.max_items:
        raise PayloadTooLarge(
            f"request JSON holds more than {limit.items_setting} numbers and lists "
            f"({items:,} so far): send fewer rows per request, or large tensors as binary (the "
            "V2 binary tensor extension)"
        )


_MAX_COUNT_DIGITS = 18  # a byte count below 10^18: beyond any body, and cheap to convert


def byte_count(value: bytes) -> int | None:
    """A header's decimal byte count; None unless it is ASCII digits, at most 18 of them.

    NOTE: bounded before ``int()``: Python refuses more than 4,300 digits with a ValueError.
    """
    if not value.isdigit():  # bytes.isdigit: ASCII digits only, and at least one
        return None
    digits = value.lstrip(b"0")
    return int(digits or b"0") if len(digits) <= _MAX_COUNT_DIGITS else None


def megabytes(size: int) -> str:
    """Bytes as a person reads them: 41.2 MB (10^6 bytes; exact counts stay in the setting)."""
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


def is_image(value: bytes | None) -> bool:
    """Whether a Content-Type names an encoded image this server reads."""
    return value is not None and value.partition(b";")[0].strip().lower() in IMAGE_TYPES


def _check_type(value: bytes | None, origin: bytes | None, binary: bool, images: bool) -> None:
    send = "send JSON with 'Content-Type: application/json'"
    if binary:
        send += " (or 'application/octet-stream' with Inference-Header-Content-Length)"
    if images:
        send += " (or an image model's input as 'image/png' or 'image/jpeg')"
        if is_image(value):
            return
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
