"""What a body may be (type, encoding) and the numbers a client writes, without a server."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import pytest

from service.errors import (
    ClientDisconnected,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.http.limits import BodyBudget
from service.http.request import KNOWN, Body, Head, Request
from service.request_body import BodyLimit, Decoder, body_decoder, byte_count, read_body
from service.routes.paths import check_version, path_version


def scope(**headers: str) -> Head:
    """A request head holding ``headers`` (keyword names, with _ for -)."""
    head = Head()
    for name, value in headers.items():
        setattr(head, KNOWN[name.replace("_", "-").encode()], value.encode())
    return head


class Feeder:
    """A connection that hands the body over one chunk each time the route asks for more."""

    def __init__(self, chunks: list[bytes], gone_after: int | None = None) -> None:
        self.chunks = chunks
        self.taken = 0
        self.gone_after = gone_after

    def want_body(self, body: Body) -> None:
        if self.taken == self.gone_after:
            body.fail(ClientDisconnected("client disconnected before sending the whole body"))
            return
        body.feed(self.chunks[self.taken])
        self.taken += 1
        if self.taken == len(self.chunks):
            body.end()

    def body_waiting(self, body: Body) -> None:
        pass


def streamed(
    feeder: Feeder, content_length: bytes | None = None, budget: BodyBudget | None = None
) -> Request:
    head = Head()
    head.content_length = content_length
    return Request("POST", b"/", "/", b"", [], head, body=Body(feeder, budget))


def limited(most: int, setting: str = "max_body_bytes") -> BodyLimit:
    return BodyLimit(most, f"{setting} (FOLDSERVE_{setting.upper()}={most})")


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


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
def test_a_body_is_decoded_as_it_arrives(encoding: bytes) -> None:
    plain = b'{"inputs": [[' + b"0.5," * 5000 + b"1]]}"
    packed = gzip.compress(plain) if encoding == b"gzip" else zlib.compress(plain)
    request = streamed(Feeder(split(packed, 100)))
    body = asyncio.run(read_body(request, limited(len(plain)), Decoder(encoding)))
    assert body == plain


def test_a_zip_bomb_stops_at_the_limit_not_at_its_end() -> None:
    packed = gzip.compress(bytes(50_000_000))  # ~49 kB that inflate to 50 MB
    chunks = split(packed, 1000)
    feeder = Feeder(chunks)
    with pytest.raises(PayloadTooLarge) as refused:
        asyncio.run(read_body(streamed(feeder), limited(1_000_000), Decoder(b"gzip")))
    assert "exceeds max_body_bytes (FOLDSERVE_MAX_BODY_BYTES=1000000" in refused.value.message
    assert "once decoded (gzip;" in refused.value.message
    assert feeder.taken < len(chunks) // 10  # refused early: never more than ~1 MB inflated


def test_a_broken_stream_is_400() -> None:
    packed = gzip.compress(b"{}")
    for data, message in [
        (b"garbage", "not valid gzip data"),
        (packed[:-1], "truncated"),
        (packed + b"!", "1 bytes follow the end"),
    ]:
        request = streamed(Feeder([data]))
        with pytest.raises(InvalidInput, match=message):
            asyncio.run(read_body(request, limited(100), Decoder(b"gzip")))


def test_a_declared_length_of_5000_digits_is_413_at_once() -> None:
    feeder = Feeder([b"{}"])
    with pytest.raises(PayloadTooLarge, match="5000-digit"):
        asyncio.run(read_body(streamed(feeder, b"9" * 5000), limited(100), None))
    assert feeder.taken == 0


def test_a_declared_length_over_the_limit_is_413_before_a_byte_is_read() -> None:
    feeder = Feeder([b"x" * 200])
    with pytest.raises(PayloadTooLarge, match="200 bytes exceeds max_json_bytes"):
        asyncio.run(read_body(streamed(feeder, b"200"), limited(100, "max_json_bytes"), None))
    assert feeder.taken == 0


def test_a_chunked_body_is_joined_and_refused_as_it_passes_the_limit() -> None:
    request = streamed(Feeder([b'{"a":', b"1}"]))
    assert asyncio.run(read_body(request, limited(100), None)) == b'{"a":1}'
    feeder = Feeder([b"x" * 60] * 5)
    with pytest.raises(PayloadTooLarge, match="120 bytes received"):
        asyncio.run(read_body(streamed(feeder), limited(100), None))
    assert feeder.taken == 2


def test_a_client_gone_mid_body_is_a_499_not_a_bad_request() -> None:
    request = streamed(Feeder([b'{"a":', b"1}"], gone_after=1))
    with pytest.raises(ClientDisconnected) as caught:
        asyncio.run(read_body(request, limited(100), None))
    assert caught.value.status == 499


def test_json_holding_more_items_than_the_limit_is_refused_before_parsing() -> None:
    few = b'{"inputs": [' + b",".join([b"[1,2,3]"] * 10) + b"]}"  # 10 lists, 30 numbers
    limit = BodyLimit(1000, "max_json_bytes", max_items=45, items_setting="max_json_items (45)")
    assert asyncio.run(read_body(streamed(Feeder([few])), limit, None)) == few
    many = b'{"inputs": [' + b",".join([b"[1,2,3]"] * 12) + b"]}"  # 12 lists, 36 numbers
    with pytest.raises(
        PayloadTooLarge, match=r"more than max_json_items \(45\) numbers and lists \(48 so far\)"
    ):
        asyncio.run(read_body(streamed(Feeder([many])), limit, None))


def test_bodies_held_at_once_are_bounded_by_the_budget_and_given_back() -> None:
    budget = BodyBudget(100)
    first = streamed(Feeder([b"x" * 80]), budget=budget)
    assert asyncio.run(read_body(first, limited(1000), None)) == b"x" * 80
    second = streamed(Feeder([b"y" * 80]), budget=budget)
    with pytest.raises(Overloaded, match="max_body_memory_bytes") as refused:
        asyncio.run(read_body(second, limited(1000), None))
    assert refused.value.status == 503 and "Retry-After" in refused.value.headers()
    first.body.release()
    second.body.release()
    assert budget.held == 0


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


def test_a_gzip_bomb_of_numbers_is_refused_from_its_first_pieces() -> None:
    """A compressed body whose first pieces already say the whole holds several times the items
    allowed is refused then, not after inflating the limit's worth (issue 17's hostile client)."""
    row = b"[" + b",".join([b"3.0"] * 64) + b"]"
    bomb = gzip.compress(b'{"inputs": [' + b",".join([row] * 200_000) + b"]}")  # 12.8M numbers
    limit = BodyLimit(
        64 << 20, "max_json_bytes", max_items=1 << 19, items_setting="max_json_items (524288)"
    )
    feeder = Feeder(split(bomb, 65536))
    request = streamed(feeder, str(len(bomb)).encode())
    with pytest.raises(PayloadTooLarge, match=r"would hold about [\d,]+ numbers and lists"):
        asyncio.run(read_body(request, limit, Decoder(b"gzip")))
    assert request.body.held <= 1 << 20  # a piece or four inflated, not 2 MB of numbers
    # A body within the limit, compressed as well, is read whole.
    fits = b'{"inputs": [' + b",".join([row] * 4000) + b"]}"  # 256,000 numbers
    packed = gzip.compress(fits)
    request = streamed(Feeder(split(packed, 65536)), str(len(packed)).encode())
    assert asyncio.run(read_body(request, limit, Decoder(b"gzip"))) == fits
