"""One client's HTTP/2 connection carrying gRPC calls (RFC 9113 with gRPC's rules on top): frames
in, calls started, answers out within the client's flow-control windows, and a drain that ends
the connection once its calls are answered.

Everything runs in the event loop's thread; each read is handled whole, and the frames it asks
for (settings and ping acknowledgements, window updates) leave in one write at its end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service.http import eager
from service.http.limits import BodyBudget
from service.rpc.status import Code
from service.rpc.wire import frames as f
from service.rpc.wire import rates
from service.rpc.wire.call import Aborted, Call
from service.rpc.wire.headers import Fields, HeaderDecoder, HeaderError, encode
from service.rpc.wire.methods import Kind, Method
from service.rpc.wire.rates import Bucket
from service.rpc.wire.run import run

log = logging.getLogger(__name__)

# What this server offers each connection. Streams at once: each is admitted (and its message
# bounded) as any request is, this only keeps one connection from holding thousands.
MAX_STREAMS = 1024
RECEIVE_WINDOW = 1 << 20  # per stream: a 64-row call of most models arrives without a pause
CONNECTION_WINDOW = 16 << 20
LINGER_S = 1.0  # after a GOAWAY for a broken protocol, before the socket closes
MAX_FRAME = 1 << 18  # larger DATA frames from the client: fewer frames for large tensors
_SETTINGS = {
    f.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    f.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
    f.MAX_FRAME_SIZE: MAX_FRAME,
    f.ENABLE_PUSH: 0,
}
_HEAD_SIZE, _DATA, _HEADERS = f.FRAME_HEAD_SIZE, f.DATA, f.HEADERS
_GRPC_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_GRPC_BLOCK = encode(_GRPC_HEADERS)
_OK_BLOCK = encode([(b"grpc-status", b"0")])
_INITIAL_HEAD = f.FRAME_HEAD.pack(len(_GRPC_BLOCK) << 8 | f.HEADERS, f.END_HEADERS, 0)[:5]
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


class ConnectionError_(Exception):
    """The client broke the protocol: the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class WireLimits:
    max_message_bytes: int  # one request message (max_body_bytes)
    max_header_bytes: int  # one header block, decoded (max_header_bytes)
    max_connections: int = 2048  # open at once (max_connections): past it, GOAWAY and close
    preface_timeout_s: float = 10.0  # to start speaking HTTP/2 (header_timeout_s)


class Site(Protocol):
    """What a connection needs from its server."""

    methods: dict[bytes, Method]
    limits: WireLimits
    budget: BodyBudget

    def opened(self, connection: Connection) -> int:
        """Count it in; the connections now open."""
        ...

    def closed(self, connection: Connection) -> None: ...


class Connection(asyncio.Protocol):
    def __init__(self, site: Site) -> None:
        self._site = site
        self._methods = site.methods
        self._limits = site.limits
        self._transport: asyncio.Transport | None = None
        # NOTE: kept: on Python 3.11 asyncio.get_running_loop() is a getpid() system call.
        self.loop = self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._preface_seen = False
        self._settings_seen = False
        self._decoder = HeaderDecoder(site.limits.max_header_bytes)
        self._block: bytearray | None = None  # a header block waiting for CONTINUATION
        self._block_stream = 0
        self._block_ends_stream = False
        self.calls: dict[int, Call] = {}
        self._last_stream = 0
        self._send_window = f.DEFAULT_WINDOW
        self._peer_window = f.DEFAULT_WINDOW  # the client's initial window for each stream
        self._peer_frame = f.DEFAULT_FRAME_SIZE
        self._recv_unacked = 0
        self._pending: list[bytes] = []  # frames to write at the end of this read
        self._blocked: dict[int, Call] = {}  # calls waiting for the client's window
        self._waiting_writers: set[Call] = set()
        self.write_paused = False
        self.going_away = False  # no new calls (either side sent GOAWAY)
        self._goaway_sent = False
        self.peer = ""
        self.client: tuple[str, int] | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._silent: asyncio.TimerHandle | None = None
        self._failed = False  # closing: what still comes is dropped
        now = self._loop.time()
        self._resets = Bucket(*rates.RESETS, now)
        self._pings = Bucket(*rates.PINGS, now)
        self._settings_frames = Bucket(*rates.SETTINGS, now)

    # -- asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        address = transport.get_extra_info("peername")
        self.peer = _peer(address)
        if isinstance(address, tuple) and len(address) >= 2:
            self.client = (str(address[0]), int(address[1]))
        greeting = f.settings_frame(_SETTINGS)
        if self._site.opened(self) > self._limits.max_connections:
            transport.write(greeting)
            self._fail(f.ENHANCE_YOUR_CALM, "too many connections (max_connections)")
            return
        transport.write(greeting + f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW))
        # A connection that never starts speaking HTTP/2 would be held for ever.
        self._silent = self._loop.call_later(self._limits.preface_timeout_s, self._no_preface)

    def _no_preface(self) -> None:
        if not self._settings_seen and self._transport is not None:
            self._fail(f.PROTOCOL_ERROR, "no HTTP/2 preface within header_timeout_s")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._silent is not None:
            self._silent.cancel()
        for call in list(self.calls.values()):
            call.closed(cancel=True)
        self.calls.clear()
        self._blocked.clear()
        for call in self._waiting_writers:
            call.wake_writer()
        self._waiting_writers.clear()
        self._transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        self._site.closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiting, self._waiting_writers = self._waiting_writers, set()
        for call in waiting:
            call.wake_writer()

    def data_received(self, data: bytes) -> None:
        if self._failed:
            return
        try:
            self._read(data)
        except ConnectionError_ as exc:
            self._fail(exc.code, exc.reason)
        self._write_pending()

    def eof_received(self) -> bool | None:
        return None  # the transport closes

    # -- reading frames

    def _read(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        if not self._preface_seen:
            if len(data) < len(f.PREFACE):
                if not f.PREFACE.startswith(data):
                    raise ConnectionError_(f.PROTOCOL_ERROR, "not HTTP/2 (gRPC needs HTTP/2)")
                buffer += data
                return
            if not data.startswith(f.PREFACE):
                raise ConnectionError_(f.PROTOCOL_ERROR, "not HTTP/2 (gRPC needs HTTP/2)")
            self._preface_seen = True
            data = data[len(f.PREFACE) :]
        pos, end = 0, len(data)
        view = memoryview(data)  # frames' payloads as slices of it: a DATA frame is not copied
        unpack = f.FRAME_HEAD.unpack_from
        on_data, on_headers = self._on_data, self._on_headers
        while end - pos >= _HEAD_SIZE:
            length_kind, flags, stream = unpack(data, pos)
            length = length_kind >> 8
            if length > MAX_FRAME:
                raise ConnectionError_(f.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            start = pos + _HEAD_SIZE
            if end - start < length:
                break
            pos = start + length
            kind = length_kind & 0xFF
            # NOTE: a call's two frame types straight to their handlers: the frame path is
            # most of this layer's cost per call.
            if kind == _DATA and self._block is None:
                on_data(flags, stream & 0x7FFFFFFF, view[start:pos])
            elif kind == _HEADERS and self._block is None and self._settings_seen:
                on_headers(flags, stream & 0x7FFFFFFF, view[start:pos])
            else:
                self._frame(kind, flags, stream & 0x7FFFFFFF, view[start:pos])
            if self._transport is None:
                return
        if pos < end:
            buffer += data[pos:]

    def _frame(self, kind: int, flags: int, stream: int, payload: memoryview) -> None:
        if self._block is not None and kind != f.CONTINUATION:
            raise ConnectionError_(f.PROTOCOL_ERROR, "a header block without its CONTINUATION")
        if not self._settings_seen and kind != f.SETTINGS:
            raise ConnectionError_(f.PROTOCOL_ERROR, "the client's first frame is no SETTINGS")
        if kind == f.DATA:
            self._on_data(flags, stream, payload)
        elif kind == f.HEADERS:
            self._on_headers(flags, stream, payload)
        elif kind == f.WINDOW_UPDATE:
            self._on_window_update(stream, payload)
        elif kind == f.PING:
            if len(payload) != 8 or stream:
                raise ConnectionError_(f.FRAME_SIZE_ERROR, "a PING of other than 8 bytes")
            if not flags & f.ACK:
                self._within(self._pings, "PINGs")
                self._pending.append(f.frame(f.PING, f.ACK, 0, bytes(payload)))
        elif kind == f.SETTINGS:
            if not flags & f.ACK:
                self._within(self._settings_frames, "SETTINGS frames")
            self._on_settings(flags, stream, payload)
        elif kind == f.RST_STREAM:
            self._within(self._resets, "stream resets")
            call = self.calls.pop(stream, None)
            if call is not None:
                self._blocked.pop(stream, None)
                # A client resets a call at its deadline: the request path's own deadline, a
                # moment later, ends it as what it is (504 in the figures), not as a client gone.
                deadline = call.deadline
                at_deadline = deadline is not None and self._loop.time() >= deadline - 0.05
                call.closed(cancel=not at_deadline)
                self._maybe_done()
        elif kind == f.CONTINUATION:
            self._on_continuation(flags, stream, payload)
        elif kind == f.GOAWAY:
            self.going_away = True  # the client opens no more calls here
            self._maybe_done()
        elif kind == f.PUSH_PROMISE:
            raise ConnectionError_(f.PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown types: nothing to do (RFC 9113, 5.5)

    def _within(self, bucket: Bucket, what: str) -> None:
        if not bucket.take(self._loop.time()):
            raise ConnectionError_(f.ENHANCE_YOUR_CALM, f"too many {what} in too little time")

    def _on_settings(self, flags: int, stream: int, payload: memoryview) -> None:
        if stream:
            raise ConnectionError_(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            return
        if len(payload) % 6:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS of a partial entry")
        if not self._settings_seen:
            self._settings_seen = True
            if self._silent is not None:
                self._silent.cancel()
                self._silent = None
        for key, value in f.read_settings(payload):
            if key == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise ConnectionError_(f.FLOW_CONTROL_ERROR, "an initial window too large")
                delta, self._peer_window = value - self._peer_window, value
                for call in self.calls.values():
                    call.send_window += delta
            elif key == f.MAX_FRAME_SIZE:
                if not f.DEFAULT_FRAME_SIZE <= value <= f.MAX_FRAME_SIZE_LIMIT:
                    raise ConnectionError_(f.PROTOCOL_ERROR, "a max frame size out of range")
                self._peer_frame = value
        self._pending.append(f.frame(f.SETTINGS, f.ACK, 0))
        self._flush_blocked()

    def _on_window_update(self, stream: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "a WINDOW_UPDATE of other than 4 bytes")
        increment = f.read_u32(payload) & 0x7FFFFFFF
        if stream == 0:
            if increment == 0:
                raise ConnectionError_(f.PROTOCOL_ERROR, "a window update of 0")
            self._send_window += increment
            if self._send_window > f.MAX_WINDOW:
                raise ConnectionError_(f.FLOW_CONTROL_ERROR, "the window past 2^31-1")
            self._flush_blocked()
            return
        call = self.calls.get(stream)
        if call is None:
            return
        if increment == 0 or call.send_window + increment > f.MAX_WINDOW:
            self._reset(call, f.PROTOCOL_ERROR if increment == 0 else f.FLOW_CONTROL_ERROR)
            return
        call.send_window += increment
        if stream in self._blocked:
            self.flush(call)

    def _on_headers(self, flags: int, stream: int, payload: memoryview) -> None:
        if stream == 0 or not stream & 1:
            raise ConnectionError_(f.PROTOCOL_ERROR, "HEADERS on a stream a client cannot open")
        if flags & (f.PADDED | f.PRIORITY_FLAG):
            payload = _unpadded(flags, payload)
            if flags & f.PRIORITY_FLAG:
                payload = payload[5:]
        if flags & f.END_HEADERS:
            self._headers(stream, bytes(payload), bool(flags & f.END_STREAM))
            return
        self._block = bytearray(payload)
        self._block_stream = stream
        self._block_ends_stream = bool(flags & f.END_STREAM)

    def _on_continuation(self, flags: int, stream: int, payload: memoryview) -> None:
        block = self._block
        if block is None or stream != self._block_stream:
            raise ConnectionError_(f.PROTOCOL_ERROR, "a CONTINUATION out of place")
        block += payload
        if len(block) > self._limits.max_header_bytes:
            raise ConnectionError_(f.ENHANCE_YOUR_CALM, "a header block past max_header_bytes")
        if flags & f.END_HEADERS:
            self._block = None
            self._headers(stream, bytes(block), self._block_ends_stream)

    def _headers(self, stream: int, block: bytes, end_stream: bool) -> None:
        try:
            fields = self._decoder.decode(block)
        except HeaderError as exc:
            raise ConnectionError_(f.COMPRESSION_ERROR, f"a header block: {exc}") from exc
        call = self.calls.get(stream)
        if call is not None:  # the client's trailers: its side ends
            if not end_stream:
                self._reset(call, f.PROTOCOL_ERROR)
            else:
                self._requests_ended(call)
            return
        if stream <= self._last_stream:
            return  # a stream already closed (answered, or reset)
        self._last_stream = stream
        if self.going_away or len(self.calls) >= MAX_STREAMS:
            self._pending.append(f.rst_stream(stream, f.REFUSED_STREAM))
            return
        self._open(stream, fields, end_stream)

    def _open(self, stream: int, fields: Fields, end_stream: bool) -> None:
        content_type = fields.content_type
        if content_type is None or not content_type.startswith(b"application/grpc"):
            # Not a gRPC call (gRPC's spec: 415 for a content type it does not speak).
            block = encode([(b":status", b"415"), (b"content-type", b"text/plain")])
            self._pending.append(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, stream, block))
            if not end_stream:
                self._pending.append(f.rst_stream(stream, f.NO_ERROR))
            return
        now = self._loop.time()
        timeout = fields.timeout
        call = Call(
            self,
            stream,
            fields,
            None if timeout is None else _deadline(timeout, now),
            now,
            self._peer_window,
            self._limits.max_message_bytes,
            self._site.budget,
        )
        self.calls[stream] = call
        if end_stream:
            call.end_of_requests()
        target = self._methods.get(call.path)
        if fields.method != b"POST" or target is None:
            what = call.path.decode("latin-1")[:200]
            refusal = f"no method {what!r} here" if target is None else "POST only"
            call.finish(Code.UNIMPLEMENTED, refusal)
            return
        call.method = target
        if target.kind is Kind.BIDI or end_stream:
            self._start(call, target)

    def _on_data(self, flags: int, stream: int, payload: memoryview) -> None:
        size = len(payload)
        self._recv_unacked += size
        if self._recv_unacked >= CONNECTION_WINDOW // 2:
            self._pending.append(f.window_update(0, self._recv_unacked))
            self._recv_unacked = 0
        call = self.calls.get(stream)
        if call is None:
            if stream == 0 or stream > self._last_stream:
                raise ConnectionError_(f.PROTOCOL_ERROR, "DATA on a stream never opened")
            return  # answered or reset already: its window went back above
        if call.client_ended:
            self._reset(call, f.STREAM_CLOSED)
            return
        if size and not call.finished:
            try:
                call.receive(_unpadded(flags, payload) if flags & f.PADDED else payload)
            except Aborted as exc:
                call.finish(exc.code, exc.details, exc.metadata)
                return
        if flags & f.END_STREAM:
            self._requests_ended(call)
            return
        call.recv_unacked += size
        # NOTE: while requests wait in the call's inbox, its window stays as it is: a client
        # streaming faster than its handler takes them waits for it (flow control), rather
        # than fill the memory for bodies in flight. The handler's taking gives it back.
        if call.recv_unacked >= RECEIVE_WINDOW // 2 and not call.waiting():
            self._pending.append(f.window_update(stream, call.recv_unacked))
            call.recv_unacked = 0

    def _requests_ended(self, call: Call) -> None:
        call.end_of_requests()
        target = call.method
        if not call.finished and target is not None and target.kind is not Kind.BIDI:
            call.task = eager.start(self._loop, run(target, call))

    def _start(self, call: Call, target: Method) -> None:
        call.task = eager.start(self._loop, run(target, call))

    # -- writing

    def send_headers(self, call: Call) -> None:
        if call.headers_sent or (call.finished and call.trailers is None):
            return
        call.headers_sent = True
        self._write(self._header_frames(call.stream_id, _initial_block(call)))

    def answer(self, call: Call, payload: bytes) -> None:
        """A unary call's response and its OK status, in one write."""
        size = len(payload) + 5
        if (
            call.headers_sent
            or call.finished
            or call.initial_metadata
            or size > min(self._peer_frame, self._send_window, call.send_window)
            or self._transport is None
        ):
            call.send(payload, flush=False)
            call.finish(Code.OK)
            return
        stream = call.stream_id
        trailers = _OK_BLOCK + encode(call.trailing_headers) if call.trailing_headers else _OK_BLOCK
        end = f.END_HEADERS | f.END_STREAM
        parts = [
            _INITIAL_HEAD,
            stream.to_bytes(4, "big"),
            _GRPC_BLOCK,
            f.FRAME_HEAD.pack(size << 8 | f.DATA, 0, stream),
            b"\x00",
            (size - 5).to_bytes(4, "big"),
            payload,
            f.FRAME_HEAD.pack(len(trailers) << 8 | f.HEADERS, end, stream),
            trailers,
        ]
        self._send_window -= size
        call.finished = True
        call.trailers = []  # answered (not cancelled)
        if not call.client_ended:
            parts.append(f.rst_stream(stream, f.NO_ERROR))
        if self._pending:
            parts.insert(0, b"".join(self._pending))
            self._pending.clear()
        self._transport.write(b"".join(parts))
        del self.calls[stream]
        call.closed()
        if self.going_away:
            self._maybe_done()

    def flush(self, call: Call) -> None:
        """Send what ``call`` has queued, as far as the windows allow; its status once all
        its messages are out."""
        if self._transport is None or call.stream_id not in self.calls:
            return
        parts: list[bytes] = []
        if not call.headers_sent:
            if not call.out and call.trailers is not None:  # no message: status alone
                block = _initial_block(call) + encode(call.trailers)
                parts.append(self._header_frames(call.stream_id, block, end_stream=True))
                call.headers_sent = True
                self._finished(call, parts)
                return
            call.headers_sent = True
            parts.append(self._header_frames(call.stream_id, _initial_block(call)))
        out = call.out
        while out:
            room = min(self._send_window, call.send_window, self._peer_frame)
            if room <= 0:
                self._blocked[call.stream_id] = call
                break
            head = out[0]
            if len(head) <= room:
                chunk = out.popleft()
            else:
                view = memoryview(head)
                chunk, out[0] = view[:room], view[room:]
            size = len(chunk)
            parts.append(f.FRAME_HEAD.pack(size << 8 | f.DATA, 0, call.stream_id))
            parts.append(chunk)  # type: ignore[arg-type]  # a memoryview joins as bytes do
            self._send_window -= size
            call.send_window -= size
            call.out_bytes -= size
        if not out:
            self._blocked.pop(call.stream_id, None)
            if call.trailers is not None:
                block = encode(call.trailers)
                parts.append(self._header_frames(call.stream_id, block, end_stream=True))
                self._finished(call, parts)
                return
        self._write(b"".join(parts))
        call.wake_writer()

    def _finished(self, call: Call, parts: list[bytes]) -> None:
        """Our side of the stream ended (its status is in ``parts``)."""
        if not call.client_ended:
            # The client need not send the rest (a refused message, a handler done early).
            parts.append(f.rst_stream(call.stream_id, f.NO_ERROR))
        self._write(b"".join(parts))
        self._forget(call)

    def _forget(self, call: Call) -> None:
        if self.calls.pop(call.stream_id, None) is not None:
            self._blocked.pop(call.stream_id, None)
            call.closed()
            self._maybe_done()

    def _header_frames(self, stream: int, block: bytes, end_stream: bool = False) -> bytes:
        flags = f.END_STREAM if end_stream else 0
        limit = self._peer_frame
        if len(block) <= limit:
            return f.frame(f.HEADERS, flags | f.END_HEADERS, stream, block)
        pieces = [block[i : i + limit] for i in range(0, len(block), limit)]
        frames_ = [f.frame(f.HEADERS, flags, stream, pieces[0])]
        for piece in pieces[1:-1]:
            frames_.append(f.frame(f.CONTINUATION, 0, stream, piece))
        frames_.append(f.frame(f.CONTINUATION, f.END_HEADERS, stream, pieces[-1]))
        return b"".join(frames_)

    def _flush_blocked(self) -> None:
        for call in list(self._blocked.values()):
            if self._send_window <= 0:
                return
            self.flush(call)

    def grant(self, call: Call) -> None:
        """The call's handler took its waiting requests: the client may send what it held."""
        if call.recv_unacked >= RECEIVE_WINDOW // 2 and call.stream_id in self.calls:
            self._write(f.window_update(call.stream_id, call.recv_unacked))
            call.recv_unacked = 0

    def wake_when_writable(self, call: Call) -> None:
        """Wake ``call``'s writer when the transport takes data again; a writer waiting on the
        client's window is woken by the flush that sends its data."""
        if self.write_paused:
            self._waiting_writers.add(call)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._pending:
            data = b"".join(self._pending) + data
            self._pending.clear()
        transport.write(data)

    def _write_pending(self) -> None:
        if self._pending and self._transport is not None:
            data = b"".join(self._pending)
            self._pending.clear()
            self._transport.write(data)

    def _reset(self, call: Call, error: int) -> None:
        self._pending.append(f.rst_stream(call.stream_id, error))
        self.calls.pop(call.stream_id, None)
        self._blocked.pop(call.stream_id, None)
        call.closed(cancel=True)
        self._maybe_done()

    # -- ending

    def _fail(self, code: int, reason: str) -> None:
        log.info("gRPC connection from %s closed: %s", self.peer, reason)
        self._pending.append(f.goaway(self._last_stream, code, reason.encode()[:200]))
        self._write_pending()
        transport = self._transport
        if transport is None or self._failed:
            return
        for call in list(self.calls.values()):
            call.closed(cancel=True)
        self.calls.clear()
        self._close_gently(transport)

    def go_away(self) -> None:
        """Take no new calls (GOAWAY); the connection ends once its calls are answered."""
        self.going_away = True
        if not self._goaway_sent and self._transport is not None:
            self._goaway_sent = True
            self._pending.append(f.goaway(self._last_stream, f.NO_ERROR))
            self._write_pending()
        self._maybe_done()

    def end_calls(self, select: Callable[[Call], bool], code: Code, details: str) -> None:
        """End the selected calls now with this status (their handlers are cancelled)."""
        for call in [c for c in self.calls.values() if select(c)]:
            call.out.clear()
            call.out_bytes = 0
            if call.task is not None:
                call.task.cancel()  # its status is this one (run() adds none once finished)
            call.finish(code, details)
            if call.stream_id in self.calls:  # the status could not leave: the stream goes
                self._reset(call, f.CANCEL)
        self._write_pending()

    def _maybe_done(self) -> None:
        if self.going_away and not self.calls and self._transport is not None:
            self._write_pending()
            self._close_gently(self._transport)

    def _close_gently(self, transport: asyncio.Transport) -> None:
        # NOTE: closed at once, a socket with unread input answers with a reset, and the
        # client's kernel drops what it had not read yet (the GOAWAY, the last answers):
        # half-close, drop what still comes for a moment (or until the client closes), close.
        if transport.can_write_eof() and not transport.is_closing():
            if not self._failed:
                self._failed = True  # nothing more is read
                transport.write_eof()
                self._loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()


def _initial_block(call: Call) -> bytes:
    if call.initial_metadata:
        return _GRPC_BLOCK + encode(call.initial_metadata)
    return _GRPC_BLOCK


def _unpadded(flags: int, payload: memoryview) -> memoryview:
    if not flags & f.PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ConnectionError_(f.PROTOCOL_ERROR, "padding longer than its frame")
    return payload[1 : len(payload) - payload[0]]


def _deadline(timeout: bytes, now: float) -> float | None:
    """grpc-timeout: up to 8 digits and a unit (H, M, S, m, u, n)."""
    if not timeout or len(timeout) > 9:
        return None
    digits, unit = timeout[:-1], timeout[-1:]
    if not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return now + int(digits) * _TIMEOUT_UNITS[unit]


def _peer(address: Any) -> str:
    """As grpc says it: "ipv4:127.0.0.1:53422", "ipv6:[::1]:53422"."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if ":" in str(host):
            return f"ipv6:[{host}]:{port}"
        return f"ipv4:{host}:{port}"
    return "unix:" if address is not None else ""
