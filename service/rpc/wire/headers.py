"""Header blocks (RFC 7541): a client's decoded with the ``hpack`` package, the server's own
encoded without the dynamic table, and gRPC's percent-encoding of its status message."""

from __future__ import annotations

from typing import cast

import hpack

Headers = list[tuple[bytes, bytes]]


class HeaderError(Exception):
    """The block cannot be decoded: the connection's compression state is lost with it."""


class Fields:
    """A decoded header block, with the fields a call reads picked out once."""

    __slots__ = (
        "api_key",
        "authorization",
        "content_type",
        "encoding",
        "headers",
        "method",
        "path",
        "request_id",
        "timeout",
    )

    def __init__(self, headers: Headers) -> None:
        self.headers = headers
        self.path: bytes | None = None
        self.method: bytes | None = None
        self.content_type: bytes | None = None
        self.timeout: bytes | None = None
        self.encoding: bytes | None = None
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None
        self.request_id: bytes | None = None
        for name, value in headers:
            attribute = _PICKED.get(name)
            if attribute is not None and getattr(self, attribute) is None:
                setattr(self, attribute, value)


_PICKED = {
    b":path": "path",
    b":method": "method",
    b"content-type": "content_type",
    b"grpc-timeout": "timeout",
    b"grpc-encoding": "encoding",
    b"authorization": "authorization",
    b"x-api-key": "api_key",
    b"x-request-id": "request_id",
}


class HeaderDecoder:
    """One connection's decoder (its dynamic table is the connection's)."""

    def __init__(self, max_list_bytes: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_list_bytes)
        self._known: dict[bytes, Fields] = {}

    def decode(self, block: bytes) -> Fields:
        # NOTE: a client repeats its calls' headers, as references to the table and literals
        # that it does not index: a block that changes no table decodes to the same headers
        # until a block that does change it. hpack takes ~16 us for a block; a look-up, nothing.
        known = self._known.get(block)
        if known is not None:
            return known
        try:
            fields = Fields(cast(Headers, self._decoder.decode(block, raw=True)))
        except hpack.HPACKError as exc:
            raise HeaderError(str(exc) or type(exc).__name__) from exc
        except IndexError as exc:  # a block cut short inside a field
            raise HeaderError("a header block cut short") from exc
        if changes_table(block):
            self._known.clear()
        elif len(self._known) < _KNOWN_BLOCKS:
            self._known[block] = fields
        return fields


_KNOWN_BLOCKS = 32  # a client calling a few methods, with a few deadlines


def changes_table(block: bytes) -> bool:
    """Whether decoding ``block`` changes the dynamic table (RFC 7541, 6): a field added to it
    (01xxxxxx) or a size update (001xxxxx); references (1xxxxxxx) and literals not indexed
    (0000xxxx, 0001xxxx) leave it as it is."""
    i, end = 0, len(block)
    while i < end:
        first = block[i]
        if first & 0x80:
            i = _skip_integer(block, i, 0x7F)
            continue
        if first & 0x60:
            return True
        i = _skip_integer(block, i, 0x0F)
        if first & 0x0F == 0:  # the name is a literal too
            i = _skip_string(block, i)
        i = _skip_string(block, i)
    return False


def _skip_integer(block: bytes, i: int, mask: int) -> int:
    if block[i] & mask != mask:
        return i + 1
    i += 1
    while i < len(block) and block[i] & 0x80:
        i += 1
    return i + 1


def _read_integer(block: bytes, i: int, mask: int) -> tuple[int, int]:
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while i < len(block):
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, i


def _skip_string(block: bytes, i: int) -> int:
    if i >= len(block):
        return len(block) + 1  # cut short: the block is not cached (hpack refuses it)
    length, i = _read_integer(block, i, 0x7F)
    return i + length


_STATIC_NAMES = {b":status": 8, b"content-type": 31}  # (":status", "200") is entry 8 whole
_NAMES: dict[bytes, bytes] = {}  # each name's bytes before its value, as written (few names)


def encode(headers: Headers) -> bytes:
    """Each field a literal that is never added to a table (so that the client's table, and
    ours, stay as they are), its name an index where the static table has it."""
    parts = []
    for name, value in headers:
        if name == b":status" and value == b"200":
            parts.append(b"\x88")
            continue
        written = _NAMES.get(name)
        if written is None:
            written = _name(name)
        parts.append(written)
        size = len(value)
        parts.append(bytes((size,)) if size < 0x7F else _integer(size, 7))
        parts.append(value)
    return b"".join(parts)


def _name(name: bytes) -> bytes:
    index = _STATIC_NAMES.get(name)
    written = b"\x00" + _integer(len(name), 7) + name if index is None else _integer(index, 4)
    if len(_NAMES) < 256:  # the server's own names, and clients' refusal metadata: few
        _NAMES[name] = written
    return written


def _integer(value: int, prefix_bits: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encode(message: str) -> bytes:
    """grpc-message: UTF-8, each byte outside printable ASCII (and '%') as %XX."""
    raw = message.encode("utf-8", "replace")
    if all(b in _UNRESERVED for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _UNRESERVED else b"%%%02X" % b for b in raw)
