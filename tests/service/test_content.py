"""What a body may be (type, encoding) and the numbers a client writes, without a server."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from typing import Any

import pytest

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.routes.asgi import byte_count, read_body
from service.routes.content import Decoder, body_decoder
from service.routes.paths import check_version, path_version


def scope(**headers: str) -> dict[str, Any]:
    return {"headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


@pytest.mark.parametrize(
    ("headers", "binary"),
    [
        ({}, False),
        ({"content_type": "application/json"}, False),
        ({"content_type": "application/json;charset=UTF-8"}, False),
        ({"content_type": "application/problem+json"}, False),
        ({"content_type": "application/octet-stream"}, True),
        ({"content_type": "application/octet-stream; x=1"}, True),
        ({"content_type": "application/json", "origin": "https://a.example"}, False),
        ({"content_encoding": "identity"}, False),
    ],
)
def test_read_as_is(headers: dict[str, str], binary: bool) -> None:
    assert body_decoder(scope(**headers), binary=binary) is None


@pytest.mark.parametrize(
    ("headers", "binary", "message"),
    [
        ({"content_type": "text/plain"}, True, "'text/plain' is not read here"),
        ({"content_type": "application/octet-stream"}, False, "'application/octet-stream'"),
        ({"content_type": "application/x-www-form-urlencoded"}, False, "curl -d"),
        ({"content_type": "multipart/form-data; boundary=b"}, False, "multipart"),
        ({"content_type": "application/jsonp"}, False, "application/jsonp"),
        ({"content_type": "text/json+json"}, False, "text/json+json"),  # +json is application/
        ({"content_type": "application/json; charset=utf-16"}, False, "UTF-8 only"),
        ({"origin": "null"}, False, "carries Origin"),
        ({"content_encoding": "br"}, False, "one of: gzip, deflate"),
        ({"content_encoding": "gzip,deflate"}, False, "one of: gzip, deflate"),
    ],
)
def test_refused_with_415(headers: dict[str, str], binary: bool, message: str) -> None:
    with pytest.raises(UnsupportedMediaType) as refused:
        body_decoder(scope(**headers), binary=binary)
    assert refused.value.status == 415
    assert message in refused.value.message
    encoding_refused = "content_encoding" in headers
    assert ("Accept-Encoding" in refused.value.headers()) is encoding_refused


def receiver(chunks: list[bytes]) -> tuple[Any, list[int]]:
    """A receive() sending ``chunks``; the list counts the messages taken."""
    taken = [0]

    async def receive() -> dict[str, Any]:
        taken[0] += 1
        return {
            "type": "http.request",
            "body": chunks[taken[0] - 1],
            "more_body": taken[0] < len(chunks),
        }

    return receive, taken


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
def test_a_body_is_decoded_as_it_arrives(encoding: bytes) -> None:
    plain = b'{"inputs": [[' + b"0.5," * 5000 + b"1]]}"
    packed = gzip.compress(plain) if encoding == b"gzip" else zlib.compress(plain)
    receive, _ = receiver(split(packed, 100))
    body = asyncio.run(read_body({"headers": []}, receive, len(plain), Decoder(encoding)))
    assert body == plain


def test_a_zip_bomb_stops_at_the_limit_not_at_its_end() -> None:
    packed = gzip.compress(bytes(50_000_000))  # ~49 kB that inflate to 50 MB
    chunks = split(packed, 1000)
    receive, taken = receiver(chunks)
    with pytest.raises(PayloadTooLarge) as refused:
        asyncio.run(read_body({"headers": []}, receive, 1_000_000, Decoder(b"gzip")))
    assert "exceeds max_body_bytes (FOLDSERVE_MAX_BODY_BYTES=1000000" in refused.value.message
    assert "once decoded (gzip;" in refused.value.message
    assert taken[0] < len(chunks) // 10  # refused early: never more than ~1 MB inflated


def test_a_broken_stream_is_400() -> None:
    packed = gzip.compress(b"{}")
    for data, message in [
        (b"garbage", "not valid gzip data"),
        (packed[:-1], "truncated"),
        (packed + b"!", "1 bytes follow the end"),
    ]:
        receive, _ = receiver([data])
        with pytest.raises(InvalidInput, match=message):
            asyncio.run(read_body({"headers": []}, receive, 100, Decoder(b"gzip")))


def test_a_declared_length_of_5000_digits_is_413_at_once() -> None:
    receive, taken = receiver([b"{}"])
    headers = {"headers": [(b"content-length", b"9" * 5000)]}
    with pytest.raises(PayloadTooLarge, match="5000-digit"):
        asyncio.run(read_body(headers, receive, 100))
    assert taken[0] == 0


@pytest.mark.parametrize(
    ("value", "count"),
    [
        (b"0", 0),
        (b"12", 12),
        (b"0012", 12),
        (b"999999999999999999", 10**18 - 1),
        (b"1000000000000000000", None),  # 19 digits
        (b"9" * 5000, None),
        (b"", None),
        (b"-1", None),
        (b"+1", None),
        (b" 1", None),
        (b"1.0", None),
        ("²".encode(), None),
        ("\u0661".encode(), None),  # ARABIC-INDIC DIGIT ONE
    ],
)
def test_byte_counts_are_bounded_before_conversion(value: bytes, count: int | None) -> None:
    assert byte_count(value) == count


@pytest.mark.parametrize("text", ["1", "7", "10", "999999999"])
def test_versions_in_their_folders_form(text: str) -> None:
    assert path_version(text) == int(text)
    assert check_version(int(text)) == int(text)


@pytest.mark.parametrize(
    "text",
    ["", "0", "01", "+1", "-1", " 1", "1 ", "1\n", "1.0", "1_0", "²", "\uff11", "1000000000"],
)
def test_other_path_versions_are_400(text: str) -> None:
    with pytest.raises(InvalidInput, match="no leading zero, sign or space"):
        path_version(text)


def test_a_long_version_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidInput) as refused:
        path_version("9" * 5000)
    assert "(5000 characters)" in refused.value.message
    assert len(refused.value.message) < 200


@pytest.mark.parametrize("number", [0, -1, 1_000_000_000, 2**64 - 1])
def test_body_versions_out_of_range_are_400(number: int) -> None:
    with pytest.raises(InvalidInput, match="from 1 to 999999999"):
        check_version(number)
