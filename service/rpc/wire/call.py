"""One gRPC call on a connection: its request messages as they arrive, its answer as it leaves,
and what its handler reads and sets (the part of grpc.aio's ServicerContext that foldserve's
handlers use: the client's headers, the deadline, initial and trailing metadata, abort)."""

from __future__ import annotations

import asyncio
import base64
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import NoReturn, Protocol

from service.errors import FoldserveError
from service.http.limits import BodyBudget
from service.rpc.status import Code
from service.rpc.wire.headers import Fields, Headers, percent_encode
from service.rpc.wire.methods import Method

MESSAGE_PREFIX = 5  # compressed flag (1 byte), length (4 bytes, big-endian)
# A stream's answers queued past this many bytes (the client reading slower than they come)
# make its handler wait before the next one.
QUEUED_HIGH = 256 << 10
Metadata = Iterable[tuple[str, str | bytes]]


class Owner(Protocol):
    """What a call asks of its connection (service.rpc.wire.connection.Connection)."""

    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None
    write_paused: bool

    def send_headers(self, call: Call) -> None: ...

    def flush(self, call: Call) -> None: ...

    def answer(self, call: Call, payload: bytes) -> None: ...

    def wake_when_writable(self, call: Call) -> None: ...

    def grant(self, call: Call) -> None: ...


class Aborted(Exception):
    """The call ends with this status (a handler's ``abort``, or a request the transport
    refuses: too large, undecodable)."""

    def __init__(self, code: Code, details: str, metadata: Metadata = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.metadata = tuple(metadata)


class Call:
    __slots__ = (
        "_arrived",
        "_budget",
        "_connection",
        "_flag",
        "_held",
        "_limit",
        "_messages",
        "_missing",
        "_pieces",
        "_prefix",
        "_writable",
        "arrived",
        "client",
        "client_ended",
        "deadline",
        "fields",
        "finished",
        "headers_sent",
        "initial_metadata",
        "method",
        "out",
        "out_bytes",
        "path",
        "recv_unacked",
        "send_window",
        "stream_id",
        "task",
        "trailers",
        "trailing_headers",
    )

    def __init__(
        self,
        connection: Owner,
        stream_id: int,
        fields: Fields,
        deadline: float | None,
        arrived: float,
        send_window: int,
        limit: int,
        budget: BodyBudget,
    ) -> None:
        self.stream_id = stream_id
        self.fields = fields  # the client's headers
        self.path: bytes = fields.path or b""
        self.method: Method | None = None  # None: no such method (refused)
        self.deadline = deadline  # the loop's clock (grpc-timeout), or None
        self.arrived = arrived  # the loop's clock when its headers came
        self.client = connection.client  # (host, port), or None (not over TCP)
        self.task: asyncio.Task[None] | None = None
        self.send_window = send_window
        self.recv_unacked = 0  # bytes received on the stream and not yet granted back
        self.client_ended = False  # the client sent END_STREAM: no more requests
        self.finished = False  # our status is on its way: the call is over for us
        self.headers_sent = False
        self.out: deque[bytes | memoryview] = deque()  # DATA not yet sent (flow control)
        self.out_bytes = 0
        self.trailers: Headers | None = None  # once finishing: sent after the last DATA
        self.initial_metadata: Headers = []
        self._connection = connection
        self._limit = limit
        self._budget = budget
        self._held = 0
        self._prefix = bytearray()  # a message's prefix, when it came split
        self._pieces: list[memoryview] = []  # a message that came in several frames, so far
        self._missing = -1  # bytes of the message being put together still to come (-1: none)
        self._flag = 0
        self._messages: deque[bytes] = deque()
        self._arrived: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.trailing_headers: Headers = []  # sent with the status

    # -- requests in

    def receive(self, data: memoryview) -> None:
        """Bytes of the stream's DATA: whole messages join the inbox. Raises Aborted for a
        message over the limit, one that does not fit the memory budget, or one compressed
        in a way this server cannot read."""
        pos, end = 0, len(data)
        while pos < end:
            if self._missing < 0:  # between messages: the next one's prefix
                prefix = self._prefix
                if not prefix and end - pos >= MESSAGE_PREFIX:
                    flag, size = data[pos], int.from_bytes(data[pos + 1 : pos + 5], "big")
                    pos += MESSAGE_PREFIX
                else:
                    taken = min(MESSAGE_PREFIX - len(prefix), end - pos)
                    prefix += data[pos : pos + taken]
                    pos += taken
                    if len(prefix) < MESSAGE_PREFIX:
                        return
                    flag, size = prefix[0], int.from_bytes(prefix[1:5], "big")
                    prefix.clear()
                self._take_room(size)
                if end - pos >= size:  # whole, in this frame: one copy
                    self._arrive(flag, bytes(data[pos : pos + size]))
                    pos += size
                    continue
                self._flag, self._missing = flag, size
            # NOTE: the pieces are views of the frames as read: joined once, when all came.
            taken = min(self._missing, end - pos)
            self._pieces.append(data[pos : pos + taken])
            pos += taken
            self._missing -= taken
            if self._missing == 0:
                message = b"".join(self._pieces)
                self._pieces.clear()
                self._missing = -1
                self._arrive(self._flag, message)

    def _take_room(self, size: int) -> None:
        if size > self._limit:
            raise Aborted(
                Code.RESOURCE_EXHAUSTED,
                f"the message is {size} bytes, more than this server takes ({self._limit}, "
                "max_body_bytes)",
            )
        try:
            self._budget.take(size)
        except FoldserveError as exc:
            retry = [(name.lower(), value) for name, value in exc.headers().items()]
            raise Aborted(Code.UNAVAILABLE, exc.message, retry) from exc
        self._held += size

    def _arrive(self, flag: int, message: bytes) -> None:
        if flag:
            message = self._inflate(message)
        self._messages.append(message)
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    def _inflate(self, message: bytes) -> bytes:
        encoding = self.fields.encoding
        if encoding not in (b"gzip", b"deflate"):
            name = (encoding or b"identity").decode("latin-1")
            raise Aborted(Code.UNIMPLEMENTED, f"a compressed message with grpc-encoding {name}")
        inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a zlib or a gzip header
        try:
            plain = inflater.decompress(message, self._limit + 1)
        except zlib.error as exc:
            raise Aborted(Code.INTERNAL, f"the compressed message cannot be read: {exc}") from exc
        if len(plain) > self._limit or inflater.unconsumed_tail:
            raise Aborted(
                Code.RESOURCE_EXHAUSTED,
                f"the message inflates past what this server takes ({self._limit} bytes, "
                "max_body_bytes)",
            )
        return plain

    def waiting(self) -> bool:
        """Whether whole requests wait for the handler to take them."""
        return bool(self._messages)

    def end_of_requests(self) -> None:
        self.client_ended = True
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    def only_message(self) -> bytes:
        """A unary call's request. Raises Aborted unless exactly one came whole."""
        if len(self._messages) != 1 or self._missing >= 0 or self._prefix:
            raise Aborted(
                Code.INTERNAL,
                f"a unary call takes one whole request message; {len(self._messages)} came",
            )
        return self._messages.popleft()

    async def requests(self) -> AsyncIterator[bytes]:
        """A streaming call's requests, as they come, until the client ends its side."""
        messages = self._messages
        while True:
            if messages:
                message = messages.popleft()
                self._give_back(len(message))
                if not messages and not self.client_ended:
                    self._connection.grant(self)
                yield message
            elif self.client_ended:
                return
            else:
                self._arrived = asyncio.get_running_loop().create_future()
                await self._arrived
                self._arrived = None

    def _give_back(self, size: int) -> None:
        size = min(size, self._held)
        self._held -= size
        self._budget.give_back(size)

    # -- the handler's context

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(self.deadline - self._connection.loop.time(), 0.0)

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self.trailing_headers = _headers(metadata)

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        self.initial_metadata = _headers(metadata)
        self._connection.send_headers(self)

    async def abort(self, code: Code, details: str = "") -> NoReturn:
        raise Aborted(code, details)

    # -- answers out

    def send(self, payload: bytes, flush: bool = True) -> None:
        """One response message, sent as the client's flow control allows (with the status,
        in the same write, when ``flush`` is False and ``finish`` follows)."""
        if self.finished:
            return
        framed = b"\x00" + len(payload).to_bytes(4, "big") + payload
        self.out.append(framed)
        self.out_bytes += len(framed)
        if flush:
            self._connection.flush(self)

    def answer(self, payload: bytes) -> None:
        """A unary call's response, then its OK status."""
        if not self.finished:
            self._connection.answer(self, payload)

    async def writable(self) -> None:
        """Wait while this call's unsent answers, or the connection's, are too many."""
        while not self.finished and (self.out_bytes > QUEUED_HIGH or self._connection.write_paused):
            self._writable = self._connection.loop.create_future()
            self._connection.wake_when_writable(self)
            await self._writable
            self._writable = None

    def wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def finish(self, code: Code, details: str = "", metadata: Metadata = ()) -> None:
        """End the call with this status, after the answers already sent (once)."""
        if self.finished:
            return
        trailers = [(b"grpc-status", _STATUS[code])]
        if details:
            trailers.append((b"grpc-message", percent_encode(details)))
        trailers += self.trailing_headers
        if metadata:
            trailers += _headers(metadata)
        self.trailers = trailers
        self.finished = True
        self._connection.flush(self)

    def closed(self, cancel: bool = False) -> None:
        """The stream is gone (answered, reset, or its connection lost): its requests' memory
        goes back, and with ``cancel`` its handler, if still running, is cancelled."""
        self.finished = True
        if self._messages:
            self._messages.clear()
        if self._pieces:
            self._pieces.clear()
        if self._held:
            self._give_back(self._held)
        if self._writable is not None:
            self.wake_writer()
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)
        task = self.task
        if cancel and task is not None and not task.done():
            task.cancel()


_STATUS = {code: b"%d" % code for code in Code}


def _headers(metadata: Metadata) -> Headers:
    out: Headers = []
    for key, value in metadata:
        name = key.lower().encode("latin-1")
        if isinstance(value, bytes):
            out.append((name, base64.b64encode(value).rstrip(b"=")))
        else:
            out.append((name, value.encode("latin-1", "replace")))
    return out
