"""foldserve's own HTTP/2 for gRPC (service/rpc/wire/) at the frame level: an independent HTTP/2
client (the ``h2`` package) on a socket to the production server, sending what grpcio never
does (messages split byte by byte, tiny windows, PINGs, other content types, compressed and
oversized messages, garbage); and the message and header decoding against arbitrary input."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import Service, create_app
from service.http.limits import BodyBudget
from service.rpc import inference_pb2 as pb
from service.rpc.wire.call import Aborted, Call
from service.rpc.wire.headers import Fields, HeaderDecoder
from service.settings import Settings
from tests.service.conftest import SHIPPED_STORE, running

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = json.loads((ROOT / "model_store" / "digits-mlp" / "1" / "manifest.json").read_text())
GOLDEN_IN = np.asarray(MANIFEST["golden"]["inputs"], dtype=np.float32)
GOLDEN_OUT = np.asarray(MANIFEST["golden"]["outputs"], dtype=np.float32)
INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = tmp_path_factory.mktemp("wire") / "store"
    shutil.copytree(SHIPPED_STORE, store)
    service = create_app(
        Settings(model_store=store, grpc=True, grpc_port=0, max_body_bytes=MAX_BODY)
    )
    with running(service):
        yield service


def _message(rows: np.ndarray = GOLDEN_IN) -> bytes:
    request = pb.ModelInferRequest(model_name="digits-mlp")
    request.inputs.add(name="input", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(np.ascontiguousarray(rows, "<f4").tobytes())
    data: bytes = request.SerializeToString()
    return data


def _framed(message: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(message)) + message


class Client:
    """One HTTP/2 connection, driven by hand."""

    def __init__(self, port: int, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.flush()
        self.events: list[Any] = []
        self.granting = True  # give back the window for what arrives

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def call(self, path: str = INFER, content_type: str = "application/grpc", **extra: str) -> int:
        stream = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", content_type),
            ("te", "trailers"),
            *extra.items(),
        ]
        self.h2.send_headers(stream, headers)
        return stream

    def send(self, stream: int, data: bytes, end: bool = True) -> None:
        self.h2.send_data(stream, data, end_stream=end)
        self.flush()

    def read(self) -> list[Any]:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        events = self.h2.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived) and self.granting:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        self.events += events
        return events

    def answer(self, stream: int) -> tuple[dict[str, str], bytes, dict[str, str]]:
        """Headers, DATA and trailers of one call, once it ended."""
        while not any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) and e.stream_id == stream
            for e in self.events
        ):
            self.read()
        blocks = [
            {k.decode(): v.decode() for k, v in e.headers}
            for e in self.events
            if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived)
            and e.stream_id == stream
        ]
        data = b"".join(
            e.data
            for e in self.events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream
        )
        headers = blocks[0] if blocks else {}
        trailers = blocks[1] if len(blocks) > 1 else headers  # trailers-only: one block
        return headers, data, trailers

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def client(app: Service, window: int | None = None) -> Iterator[Client]:
    assert app.grpc is not None and app.grpc.port
    c = Client(app.grpc.port, window)
    try:
        yield c
    finally:
        c.close()


def _outputs(data: bytes) -> np.ndarray:
    flag, size = struct.unpack(">BI", data[:5])
    assert flag == 0 and len(data) == 5 + size
    answer = pb.ModelInferResponse.FromString(data[5:])
    return np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(
        tuple(answer.outputs[0].shape)
    )


def test_a_message_split_byte_by_byte_is_answered(app: Service) -> None:
    with client(app) as c:
        stream = c.call()
        framed = _framed(_message())
        for i in range(len(framed)):
            c.h2.send_data(stream, framed[i : i + 1], end_stream=i == len(framed) - 1)
        c.flush()
        headers, data, trailers = c.answer(stream)
    assert headers[":status"] == "200" and headers["content-type"] == "application/grpc"
    assert trailers["grpc-status"] == "0" and trailers["x-request-id"]
    np.testing.assert_allclose(_outputs(data), GOLDEN_OUT, rtol=1e-4, atol=1e-4)


def test_an_answer_waits_for_the_clients_window(app: Service) -> None:
    # The client lets 16 bytes in at a time: the answer comes in pieces of at most 16, each
    # after the client gave its window back, and whole.
    with client(app, window=16) as c:
        stream = c.call()
        c.send(stream, _framed(_message()))
        _, data, trailers = c.answer(stream)
        sizes = [
            len(e.data)
            for e in c.events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream
        ]
    assert trailers["grpc-status"] == "0"
    assert max(sizes) <= 16 and len(sizes) >= len(data) // 16
    np.testing.assert_allclose(_outputs(data), GOLDEN_OUT, rtol=1e-4, atol=1e-4)


def test_a_stalled_answer_leaves_other_calls_alone(app: Service) -> None:
    # One call's answer waits for a window the client never gives back; a second call on the
    # same connection is answered meanwhile.
    with client(app, window=16) as c:
        c.granting = False
        first = c.call()
        c.send(first, _framed(_message()))
        c.read()
        c.granting = True
        c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        c.flush()
        second = c.call()
        c.send(second, _framed(_message(GOLDEN_IN[:1])))
        _, data, trailers = c.answer(second)
        assert trailers["grpc-status"] == "0"
        np.testing.assert_allclose(_outputs(data)[0], GOLDEN_OUT[0], rtol=1e-4, atol=1e-4)


def test_a_stream_whose_answers_are_not_read_holds_its_client_back(app: Service) -> None:
    # The client streams 1,200 requests of 64 rows (20 MB) and reads no answer (it gives no
    # window back): the answers back up, the handler stops taking requests, and the call's
    # window, no longer given back, stops the client after a few MB. Once it reads, all 1,200
    # are answered.
    count = 1200
    message = _framed(_message(np.tile(GOLDEN_IN, (8, 1))))
    total = count * len(message)
    with client(app) as c:
        c.granting = False
        stream = c.call(path="/inference.GRPCInferenceService/ModelStreamInfer")
        sent = _send_while_allowed(c, stream, message, 0, total, seconds=3.0)
        assert sent < total // 2, f"{sent} of {total} bytes sent with no answer read"
        c.granting = True
        for event in c.events:  # what was received and not acknowledged
            if isinstance(event, h2.events.DataReceived):
                c.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        c.flush()
        sent += _send_while_allowed(c, stream, message, sent, total, seconds=60.0)
        assert sent == total
        c.h2.end_stream(stream)
        c.flush()
        _, data, trailers = c.answer(stream)
    assert trailers["grpc-status"] == "0"
    answers = []
    while data:
        _, size = struct.unpack(">BI", data[:5])
        answers.append(pb.ModelStreamInferResponse.FromString(data[5 : 5 + size]))
        data = data[5 + size :]
    assert len(answers) == count and not any(a.error_message for a in answers)


def _send_while_allowed(
    c: Client, stream: int, message: bytes, start: int, total: int, seconds: float
) -> int:
    """Send repeated ``message`` from byte ``start`` up to ``total`` as the server's windows
    allow, for at most ``seconds`` without progress; the bytes sent."""
    sent, stalled_since, total = 0, time.monotonic(), total - start
    try:
        while sent < total and time.monotonic() - stalled_since < seconds:
            room = min(c.h2.local_flow_control_window(stream), c.h2.max_outbound_frame_size)
            if room > 0:
                offset = (start + sent) % len(message)
                piece = message[offset : offset + min(room, total - sent)]
                c.h2.send_data(stream, piece)
                c.flush()
                sent += len(piece)
                stalled_since = time.monotonic()
            # What the server sent (window updates, answers): waited for only when stopped.
            c.sock.settimeout(0.05 if room <= 0 else 0)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                c.read()
    finally:
        c.sock.settimeout(10)
    return sent


def test_pings_are_answered_and_settings_acknowledged(app: Service) -> None:
    with client(app) as c:
        c.h2.ping(b"12345678")
        c.flush()
        while not any(isinstance(e, h2.events.PingAckReceived) for e in c.events):
            c.read()
        ack = next(e for e in c.events if isinstance(e, h2.events.PingAckReceived))
        assert ack.ping_data == b"12345678"
        assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in c.events)


def test_other_content_types_get_415_and_unknown_methods_unimplemented(app: Service) -> None:
    with client(app) as c:
        json_call = c.call(content_type="application/json")
        c.send(json_call, b"{}")
        headers, _, _ = c.answer(json_call)
        assert headers[":status"] == "415"
        unknown = c.call(path="/inference.GRPCInferenceService/NoSuchMethod")
        c.send(unknown, _framed(b""))
        _, _, trailers = c.answer(unknown)
        assert trailers["grpc-status"] == "12" and "NoSuchMethod" in trailers["grpc-message"]
        # The connection goes on.
        stream = c.call()
        c.send(stream, _framed(_message(GOLDEN_IN[:1])))
        assert c.answer(stream)[2]["grpc-status"] == "0"


def test_compressed_messages(app: Service) -> None:
    message = _message(GOLDEN_IN[:2])
    with client(app) as c:
        zipped = c.call(**{"grpc-encoding": "gzip"})
        c.send(zipped, _framed(gzip.compress(message), flag=1))
        _, data, trailers = c.answer(zipped)
        assert trailers["grpc-status"] == "0"
        np.testing.assert_allclose(_outputs(data), GOLDEN_OUT[:2], rtol=1e-4, atol=1e-4)
        unknown = c.call(**{"grpc-encoding": "snappy"})
        c.send(unknown, _framed(message, flag=1))
        assert c.answer(unknown)[2]["grpc-status"] == "12"  # UNIMPLEMENTED
        # 20 MB of zeros in 20 kB: refused as it inflates past max_body_bytes.
        bomb = c.call(**{"grpc-encoding": "gzip"})
        c.send(bomb, _framed(gzip.compress(bytes(20_000_000)), flag=1))
        _, _, trailers = c.answer(bomb)
        assert trailers["grpc-status"] == "8" and "max_body_bytes" in trailers["grpc-message"]


def test_a_message_over_the_limit_is_refused_from_its_prefix(app: Service) -> None:
    with client(app) as c:
        stream = c.call()
        # Only the prefix is sent: the refusal cannot have waited for the message.
        c.send(stream, struct.pack(">BI", 0, MAX_BODY + 1), end=False)
        _, _, trailers = c.answer(stream)
    assert trailers["grpc-status"] == "8" and str(MAX_BODY) in trailers["grpc-message"]


def test_a_reset_call_leaves_the_connection_serving(app: Service) -> None:
    with client(app) as c:
        stream = c.call()
        c.send(stream, _framed(_message())[:100], end=False)
        c.h2.reset_stream(stream)
        c.flush()
        again = c.call()
        c.send(again, _framed(_message(GOLDEN_IN[:1])))
        assert c.answer(again)[2]["grpc-status"] == "0"


def test_rapid_resets_and_ping_floods_end_that_connection_only(app: Service) -> None:
    # CVE-2023-44487: calls opened and reset at once, thousands a second. Past the reset
    # bucket (1,000 at once, 100 a second) the connection ends with ENHANCE_YOUR_CALM; a
    # PING flood likewise (100 at once, 10 a second).
    def flood(send: Any) -> h2.events.ConnectionTerminated:
        with client(app) as c:
            with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
                for i in range(3000):
                    send(c, i)
                    if i % 100 == 99:
                        c.flush()
                c.flush()
                while not any(isinstance(e, h2.events.ConnectionTerminated) for e in c.events):
                    c.read()
            return next(e for e in c.events if isinstance(e, h2.events.ConnectionTerminated))

    def open_and_reset(c: Client, _: int) -> None:
        stream = c.call()
        c.h2.reset_stream(stream)

    def ping(c: Client, i: int) -> None:
        c.h2.ping(i.to_bytes(8, "big"))

    for send, what in ((open_and_reset, b"stream resets"), (ping, b"PINGs")):
        ended = flood(send)
        assert ended.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert what in (ended.additional_data or b"")
    # A client that cancels now and then, and the next connection, are served.
    with client(app) as c:
        for _ in range(50):
            open_and_reset(c, 0)
        c.flush()
        stream = c.call()
        c.send(stream, _framed(_message(GOLDEN_IN[:1])))
        assert c.answer(stream)[2]["grpc-status"] == "0"


def test_garbage_closes_that_connection_only(app: Service) -> None:
    assert app.grpc is not None and app.grpc.port
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64, bytes(range(256))):
        with socket.create_connection(("127.0.0.1", app.grpc.port), timeout=10) as sock:
            received = b""
            with contextlib.suppress(OSError):
                sock.sendall(junk)
                while chunk := sock.recv(65536):
                    received += chunk
        assert 7 in _frame_types(received)  # our SETTINGS, then GOAWAY, then closed
    # A client that speaks HTTP/2 but breaks it: a frame on stream 0 that needs a stream.
    with client(app) as c:
        c.sock.sendall(struct.pack(">IBI", 3 << 8 | 0, 0, 0) + b"abc")  # DATA on stream 0
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                c.read()
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in c.events)
    with client(app) as c:
        stream = c.call()
        c.send(stream, _framed(_message(GOLDEN_IN[:1])))
        assert c.answer(stream)[2]["grpc-status"] == "0"


def test_an_endless_header_block_is_cut_off(app: Service) -> None:
    assert app.grpc is not None and app.grpc.port
    with socket.create_connection(("127.0.0.1", app.grpc.port), timeout=10) as sock:
        settings_frame = struct.pack(">IBI", 0 << 8 | 4, 0, 0)
        block = hpack.Encoder().encode([("x-pad", "a" * 16_000)])
        # HEADERS, then CONTINUATION frames past max_header_bytes, never END_HEADERS.
        frames = struct.pack(">IBI", len(block) << 8 | 1, 0, 1) + block
        frames += (struct.pack(">IBI", len(block) << 8 | 9, 0, 1) + block) * 6
        received = b""
        with contextlib.suppress(OSError):
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings_frame + frames)
            while chunk := sock.recv(65536):
                received += chunk
    assert 7 in _frame_types(received)  # GOAWAY
    with client(app) as c:
        stream = c.call()
        c.send(stream, _framed(_message(GOLDEN_IN[:1])))
        assert c.answer(stream)[2]["grpc-status"] == "0"


def _frame_types(data: bytes) -> list[int]:
    kinds, pos = [], 0
    while pos + 9 <= len(data):
        length_kind = struct.unpack(">I", data[pos : pos + 4])[0]
        kinds.append(length_kind & 0xFF)
        pos += 9 + (length_kind >> 8)
    return kinds


# -- the decoding, against arbitrary input


class _Site:
    client = ("127.0.0.1", 1)
    peer = "ipv4:127.0.0.1:1"


def _call(limit: int = 1 << 20) -> Call:
    fields = Fields([(b":path", INFER.encode())])
    return Call(_Site(), 1, fields, None, 0.0, 65535, limit, BodyBudget(1 << 30))  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_messages_come_out_whole_however_the_frames_cut_them(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(_framed(m) for m in messages)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    call = _call()
    for start, end in itertools.pairwise(points):
        call.receive(memoryview(stream)[start:end])
    got = []
    while call._messages:
        got.append(call._messages.popleft())
    assert got == messages


def test_a_message_over_the_limit_raises_before_its_body() -> None:
    call = _call(limit=10)
    with pytest.raises(Aborted) as refused:
        call.receive(memoryview(struct.pack(">BI", 0, 11)))
    assert refused.value.code == 8


_NAMES = st.sampled_from(["x-a", "x-b", "authorization", "x-request-id", "grpc-timeout", "te"])
_VALUES = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.lists(
        st.lists(st.tuples(_NAMES, _VALUES, st.booleans()), min_size=1, max_size=6),
        min_size=1,
        max_size=8,
    ),
    huffman=st.booleans(),
    repeat=st.integers(min_value=1, max_value=3),
)
def test_header_blocks_decode_as_hpack_decodes_them(
    blocks: list[list[tuple[str, str, bool]]], huffman: bool, repeat: int
) -> None:
    # Blocks repeated as a client repeats its calls' headers: the cache of blocks that change
    # no table must give what decoding gives, whatever came between.
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), HeaderDecoder(1 << 16)
    for headers in blocks * repeat:
        fields = [
            hpack.NeverIndexedHeaderTuple(n, v) if sensitive else (n, v)
            for n, v, sensitive in headers
        ]
        block = encoder.encode(fields, huffman=huffman)
        expected = [(bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)]
        assert ours.decode(block).headers == expected


def test_the_same_bytes_decode_anew_once_the_table_changed() -> None:
    # b"\xbe" is "the newest entry of the table": after a block that adds one, the same byte
    # names another header, and must not be answered from the cache.
    encoder, ours = hpack.Encoder(), HeaderDecoder(1 << 16)
    ours.decode(encoder.encode([("x-a", "1")]))
    newest = encoder.encode([("x-a", "1")])
    assert newest == b"\xbe" and ours.decode(newest).headers == [(b"x-a", b"1")]
    ours.decode(encoder.encode([("x-b", "2")]))  # added: now the newest
    assert ours.decode(b"\xbe").headers == [(b"x-b", b"2")]


def test_silent_and_surplus_connections_are_closed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(SHIPPED_STORE, store)
    settings = Settings(
        model_store=store, grpc=True, grpc_port=0, max_connections=3, header_timeout_s=0.5
    )
    service = create_app(settings)
    with running(service):
        assert service.grpc is not None and service.grpc.port
        port = service.grpc.port
        # Silent: closed after header_timeout_s, with GOAWAY.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
            received = b""
            while chunk := silent.recv(65536):
                received += chunk
        assert 7 in _frame_types(received)
        # Three speaking HTTP/2 are served; a fourth gets GOAWAY and is closed.
        with contextlib.ExitStack() as open_now:
            clients = [open_now.enter_context(client(service)) for _ in range(3)]
            for c in clients:
                stream = c.call()
                c.send(stream, _framed(_message(GOLDEN_IN[:1])))
                assert c.answer(stream)[2]["grpc-status"] == "0"
            with socket.create_connection(("127.0.0.1", port), timeout=5) as surplus:
                received = b""
                with contextlib.suppress(OSError):
                    while chunk := surplus.recv(65536):
                        received += chunk
            assert 7 in _frame_types(received)
            assert b"too many connections" in received
        # Once they close, a new one is served.
        with client(service) as c:
            stream = c.call()
            c.send(stream, _framed(_message(GOLDEN_IN[:1])))
            assert c.answer(stream)[2]["grpc-status"] == "0"


@settings(max_examples=200, deadline=None)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from([b":status", b"content-type", b"grpc-status", b"x-" + b"n" * 130]),
            st.binary(min_size=0, max_size=300).map(lambda b: bytes(32 + x % 95 for x in b)),
        ),
        max_size=6,
    )
)
def test_the_servers_header_blocks_read_back_as_written(headers: list[tuple[bytes, bytes]]) -> None:
    from service.rpc.wire.headers import encode

    read = hpack.Decoder().decode(encode(headers), raw=True)
    assert [(bytes(n), bytes(v)) for n, v in read] == headers
