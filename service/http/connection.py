"""One HTTP/1.1 connection: parse with httptools, enforce the limits, answer requests in order.

Limits come before work: a head past ``max_header_bytes`` or ``max_headers`` gets 431 before any
route sees it; a head that does not arrive within ``header_timeout_s``, or a body within
``body_timeout_s`` of its head (counted only while a route is reading it), gets 408; an idle
connection is closed after ``keep_alive_timeout_s``. Requests sent back to back (pipelined) are
answered one after the other, in order; a malformed request is answered with 400 only after
every valid request before it, then the connection closes. A body a route has not asked for yet
stays in the socket (one read at most is kept), so a request waiting for admission costs nothing.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from typing import Protocol, cast
from urllib.parse import unquote

import httptools

from service.errors import (
    ClientDisconnected,
    FoldserveError,
    HeaderFieldsTooLarge,
    InvalidInput,
    RequestTimeout,
)
from service.http import eager
from service.http.limits import HEAD_READ_SLACK, BodyBudget, HttpLimits
from service.http.request import KNOWN, Body, Head, Request
from service.http.response import Response, encode, failure
from service.repeated_log import RepeatedLog
from service.settings import setting_ref

log = logging.getLogger(__name__)
# NOTE: a client holding many connections open without sending (slowloris) makes one of these
# per connection: the first is logged, the rest counted.
_slow_clients = RepeatedLog(log, "closing slow connections", logging.INFO)

# NOTE: a request answered before its body was read keeps its connection only when the rest of
# the body is small: reading and dropping more costs the server what the client chose to send.
DISCARD_LIMIT = 64 << 10
# After refusing a body, read and drop what the client still sends for a moment before closing:
# closing a socket with unread bytes makes the kernel send a reset, which can destroy the answer
# before the client reads it.
LINGER_S = 0.5
LINGER_BYTES = 1 << 20
# NOTE: an answer given before a large body's end (refused: too large, no key, no room) goes out
# after this pause, reading nothing meanwhile. A client that made a mistake learns it a moment
# later; one that sends such bodies in a loop (a 60 MB JSON, a gzip bomb) does so four times a
# second per connection instead of hundreds, each time costing the server a connection, a head
# and a first piece (at 900 a second, a third of the server's core, taken from other clients).
UNREAD_BODY_PAUSE_S = 0.25
# Long enough for a request sent just before the drain to be read from the socket.
IDLE_DRAIN_GRACE_S = 0.5


class Site(Protocol):
    """What a connection needs of its server."""

    limits: HttpLimits
    budget: BodyBudget
    draining: bool

    def opened(self, connection: Connection) -> int: ...

    def closed(self, connection: Connection) -> None: ...

    def request_id(self, head: Head) -> bytes: ...

    def eager(self, request: Request) -> bool: ...

    async def answer(self, request: Request, over_limit: bool) -> Response: ...


class _Timer(enum.Enum):
    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    DRAIN = "drain"


class _Refused(Exception):
    """Raised in a parser callback: the head breaks a limit (httptools wraps it)."""

    def __init__(self, error: FoldserveError) -> None:
        super().__init__(error.message)
        self.error = error


class _Broken:
    """A request that could not be read: answered with ``error`` in its turn, then close."""

    def __init__(self, error: FoldserveError, request_id: bytes) -> None:
        self.error = error
        self.request_id = request_id


class Connection(asyncio.Protocol):
    def __init__(self, site: Site) -> None:
        self._site = site
        self._limits = site.limits
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client: tuple[str, int] | None = None
        self._over_limit = False
        # The request being parsed, its head so far, and the ones read and waiting to be served.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head = Head()
        self._head_open = False
        self._head_bytes = 0  # bytes received since the current head began (the memory guard)
        self._parsing: Request | None = None
        self._queue: deque[Request | _Broken] = deque()
        self._active: Request | None = None
        self._task: asyncio.Task[None] | None = None
        # NOTE: one deadline, checked by the server's sweep (``check_deadline``) a few times a
        # second: setting two attributes per request, not a timer handle made and cancelled
        # three times (one loop timer per connection event cost more than the parse).
        self._timer_kind: _Timer | None = None
        self._deadline = 0.0
        self._reading_paused = False
        self._writing_paused = False
        self._stopped_parsing = False  # a refusal or an error ended the request stream
        self._closing = False  # close once the queue is answered (draining, Connection: close)
        self._lingering = -1  # bytes dropped since the answer that closes; -1: not lingering
        self._head_began = False  # a head began during the current feed_data

    # ---------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # NOTE: uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None
        count = self._site.opened(self)
        if count > self._limits.connection_cap:
            transport.abort()  # far past the limit: no answer, no memory
            return
        self._over_limit = count > self._limits.max_connections
        self._arm(_Timer.IDLE, self._limits.keep_alive_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._site.closed(self)
        gone = ClientDisconnected("client disconnected before sending the whole body")
        for request in (self._parsing, self._active, *self._queue):
            if isinstance(request, Request):
                request.body.fail(gone)
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the client cannot read an answer: stop working for it
        if self._active is not None:
            self._active.body.release()

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._linger(len(data))
            return
        if self._stopped_parsing:
            return
        if self._head_open or self._parsing is None:
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes + HEAD_READ_SLACK:
                self._refuse_head(self._too_large_head())
                return
        self._head_began = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # NOTE: no protocol switch is offered (no WebSocket, no h2c): the request it came
            # with is answered as any other, and the bytes of the other protocol are not read.
            self._stop_parsing()
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse_head(cause.error)
            else:
                raise
        except httptools.HttpParserError as exc:
            self._malformed(str(exc))
            return
        if self._head_open and self._head_began:
            # A head began in this read, after the end of another message: what it holds so far
            # is at most this read.
            self._head_bytes = min(self._head_bytes, len(data))
        self._after_read()

    def _after_read(self) -> None:
        """A read is parsed through: start the next request, then keep unclaimed bytes out.

        NOTE: a request starts here, not when its head completes: the parser hands over the
        body of the same read only after the head's callback returns, so a request started
        there would find its body missing, wait for it, and become a task and a turn of the
        loop (a third of a one-sample request's cost). Started here, it finds every byte of
        its read; a body still on its way is waited for as before.
        """
        if self._active is None and self._queue:
            self._serve_next()
        parsing = self._parsing
        if parsing is not None and parsing.body.unclaimed:
            self._pause_reading()  # no route asked for these bytes yet: read no more for now

    def eof_received(self) -> bool | None:
        # The client sent all it will: answer what was read, then close.
        self._closing = True
        if self._parsing is not None:
            self._parsing.body.fail(ClientDisconnected("client ended the connection mid-body"))
        if self._active is None and not self._queue:
            self._close()
        return True  # keep the transport open for our answers

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._active is None and self._queue:
            self._serve_next()

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head = Head()
        self._head_open = True
        self._head_began = True
        self._arm(_Timer.HEAD, self._limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head.size += len(url)
        if self._head.size > self._limits.max_header_bytes:
            raise _Refused(self._too_large_head())

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        head.count += 1
        head.size += len(name) + len(value) + 4
        if head.count > self._limits.max_headers or head.size > self._limits.max_header_bytes:
            raise _Refused(self._too_large_head())
        name = name.lower()
        self._headers.append((name, value))
        known = KNOWN.get(name)
        if known is not None and getattr(head, known) is None:
            setattr(head, known, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_bytes = 0
        head, parser = self._head, self._parser
        request_id = self._site.request_id(head)
        raw_path, query = self._target()
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        method = parser.get_method().decode("ascii", "replace")
        has_body = head.content_length not in (None, b"0") or self._chunked()
        request = Request(
            method,
            raw_path,
            path,
            query,
            self._headers,
            head,
            http_version=parser.get_http_version(),
            keep_alive=parser.should_keep_alive(),
            client=self._client,
            request_id=request_id,
            started=time.perf_counter(),
            arrived=self._loop.time(),
            body=Body(self if has_body else None, self._site.budget),
        )
        self._parsing = request
        self._disarm()
        if has_body:
            self._arm(_Timer.BODY, self._limits.body_timeout_s)
        self._queue.append(request)
        if self._active is not None or len(self._queue) > 1:
            self._pause_reading()  # pipelined: one request waits, no more are read meanwhile
        # Served once this read is parsed through (``_after_read``), its body's bytes with it.

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.body.feed(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        self._parsing = None
        if request is not None:
            request.body.end()
            if self._timer_kind is _Timer.BODY:
                self._disarm()

    def _target(self) -> tuple[bytes, bytes]:
        """The request target's path and query (origin form; absolute form read too)."""
        url = self._url
        if url.startswith(b"/") and b"?" not in url and b"#" not in url:
            return url, b""  # the usual target: nothing to split
        try:
            parsed = httptools.parse_url(url) if url != b"*" else None
        except httptools.HttpParserInvalidURLError:
            parsed = None
        if parsed is None:
            raise _Refused(InvalidInput(f"request target is not a path: {url[:60]!r}"))
        return parsed.path or b"/", parsed.query or b""

    def _chunked(self) -> bool:
        return any(
            name == b"transfer-encoding" and b"chunked" in value.lower()
            for name, value in self._headers
        )

    # ---------------------------------------------------------------- body flow (Body calls)

    def want_body(self, body: Body) -> None:
        if self._parsing is not None and self._parsing.body is body:
            if self._reading_paused and not self._queue:
                self._resume_reading()
            if self._timer_kind is not _Timer.BODY:
                self._arm(_Timer.BODY, self._limits.body_timeout_s)
        request = self._active
        if request is not None and request.body is body and request.head.expect is not None:
            if request.head.expect.lower() == b"100-continue" and body.received == 0:
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.head.expect = None  # asked once

    def body_waiting(self, body: Body) -> None:
        # Bytes arrived that no route asked for yet: kept, and once this read is parsed
        # through no more are read if still unclaimed (``_after_read``). The client is not the
        # slow one meanwhile, so its body clock stops.
        if self._timer_kind is _Timer.BODY:
            self._disarm()

    # ---------------------------------------------------------------- serving, in order

    def _serve_next(self) -> None:
        if self._writing_paused or self._transport is None:
            return  # resume_writing serves it
        item = self._queue.popleft()
        if isinstance(item, _Broken):
            self._queue.clear()
            self._send(failure(item.error), item.request_id, keep_alive=False, head_only=False)
            self._close(linger=True)
            return
        if self._timer_kind is _Timer.IDLE or self._timer_kind is _Timer.DRAIN:
            self._disarm()
        self._active = item
        if not self._queue and self._reading_paused and self._parsing is None:
            self._resume_reading()
        if self._site.eager(item):
            task = eager.start(self._loop, self._run(item))
            if task is not None and self._active is item:  # it waits: cancel it if need be
                self._task = task
        else:
            self._task = self._loop.create_task(self._run(item))

    def _serve_queued(self) -> None:
        if self._active is None and self._queue:
            self._serve_next()

    async def _run(self, request: Request) -> None:
        response = await self._site.answer(request, self._over_limit)
        self._finish(request, response)

    def _finish(self, request: Request, response: Response) -> None:
        self._task = None
        self._active = None
        body = request.body
        body.release()
        own = request.keep_alive and not response.close and not self._over_limit
        # Requests already read are answered (a drain, a malformed one after them); the last
        # answer says close when no more will be read.
        ending = self._closing or self._site.draining or self._stopped_parsing
        keep_alive = own and (bool(self._queue) or not ending)
        linger = pause = False
        if not body.complete:
            # Answered before the body was read (refused, or not needed): drop the rest if it is
            # small, else close rather than read it all, after a pause.
            declared = _declared(request.head.content_length)
            small = declared is not None and declared - body.received <= DISCARD_LIMIT
            body.discard()
            if small and keep_alive:
                self._resume_reading()
            else:
                keep_alive, linger = False, True
                pause = not small and not self._over_limit
        if self._transport is None or self._transport.is_closing():
            return
        if pause:
            self._active = request  # answering still: neither idle nor drained meanwhile
            self._pause_reading()
            self._loop.call_later(UNREAD_BODY_PAUSE_S, self._answer_late, request, response)
            return
        self._send(response, request.request_id, keep_alive, request.method == "HEAD")
        if not keep_alive:
            self._queue.clear()  # the client asked to close: what it sent after is not served
            self._close(linger)
        elif self._queue:
            # NOTE: the next turn of the loop, not a call: a request answered at once would
            # otherwise start the next one inside its own frame, and a long pipeline recurse.
            self._loop.call_soon(self._serve_queued)
        elif self._parsing is None and not self._head_open:
            if self._reading_paused:
                self._resume_reading()
            self._arm(_Timer.IDLE, self._limits.keep_alive_timeout_s)

    def _answer_late(self, request: Request, response: Response) -> None:
        """The answer to a request whose large body was left unread (``UNREAD_BODY_PAUSE_S``);
        then the connection closes."""
        if self._active is request:
            self._active = None
        if self._transport is None or self._transport.is_closing():
            return
        self._send(response, request.request_id, False, request.method == "HEAD")
        self._queue.clear()
        self._close(linger=True)

    def _send(
        self, response: Response, request_id: bytes, keep_alive: bool, head_only: bool
    ) -> None:
        data = encode(response, request_id, keep_alive=keep_alive, head_only=head_only)
        if response.tail is None or head_only:
            self._write(data)
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.writelines((data, response.tail))  # one vectored write, no copy

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # ---------------------------------------------------------------- refusals and errors

    def _too_large_head(self) -> HeaderFieldsTooLarge:
        limits = self._limits
        return HeaderFieldsTooLarge(
            f"request headers exceed {setting_ref('max_header_bytes', limits.max_header_bytes)} "
            f"or {setting_ref('max_headers', limits.max_headers)}"
        )

    def _refuse_head(self, error: FoldserveError) -> None:
        """A head breaks a limit: answered in its turn, after the requests before it."""
        self._stop_parsing()
        self._queue.append(_Broken(error, self._site.request_id(Head())))
        if self._active is None:
            self._serve_next()

    def _malformed(self, why: str) -> None:
        request = self._parsing
        if request is not None and not self._head_open:
            # The head was fine; its body is not (bad chunk framing): that request fails alone.
            request.body.fail(InvalidInput(f"malformed request body: {why}"))
            self._parsing = None
            self._stop_parsing()
            return
        self._refuse_head(InvalidInput(f"malformed HTTP request: {why}"))

    def _stop_parsing(self) -> None:
        self._stopped_parsing = True
        self._head_open = False
        self._pause_reading()

    # ---------------------------------------------------------------- timers

    def _arm(self, kind: _Timer, seconds: float) -> None:
        self._timer_kind = kind
        self._deadline = self._loop.time() + seconds

    def _disarm(self) -> None:
        self._timer_kind = None

    def check_deadline(self, now: float) -> None:
        """The server's sweep: act on a timer that has run out."""
        kind = self._timer_kind
        if kind is not None and now >= self._deadline:
            self._expired(kind)

    def _expired(self, kind: _Timer) -> None:
        self._timer_kind = None
        limits = self._limits
        if kind is _Timer.IDLE or kind is _Timer.DRAIN:
            if self._active is None and not self._queue and not self._head_open:
                self._close()
        elif kind is _Timer.HEAD:
            _slow_clients.note(
                "", "headers", f"headers not received within {limits.header_timeout_s:g} s"
            )
            seconds = limits.header_timeout_s
            self._refuse_head(
                RequestTimeout(
                    f"request headers not received within {seconds:g} s "
                    f"({setting_ref('header_timeout_s', seconds)})"
                )
            )
        elif kind is _Timer.BODY and self._parsing is not None:
            _slow_clients.note("", "body", f"body not received within {limits.body_timeout_s:g} s")
            seconds = limits.body_timeout_s
            self._parsing.body.fail(
                RequestTimeout(
                    f"request body not received within {seconds:g} s of its headers "
                    f"({setting_ref('body_timeout_s', seconds)})"
                )
            )
            self._parsing = None
            self._stop_parsing()

    # ---------------------------------------------------------------- flow and closing

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self._stopped_parsing:
            self._reading_paused = False
            self._transport.resume_reading()

    def drain(self) -> None:
        """The server is going away: answer what was received, then close; an idle connection
        gets a moment for a request already on its way."""
        self._closing = True
        if self._active is None and not self._queue and not self._head_open:
            self._arm(_Timer.DRAIN, IDLE_DRAIN_GRACE_S)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def idle(self) -> bool:
        return self._active is None and not self._queue

    def _close(self, linger: bool = False) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._disarm()
        if not linger or not transport.can_write_eof():
            transport.close()
            return
        # Our answer is sent; read and drop what the client is still sending for a moment.
        transport.write_eof()
        self._lingering = 0
        self._stopped_parsing = True
        self._reading_paused = False
        transport.resume_reading()
        self._loop.call_later(LINGER_S, transport.close)

    def _linger(self, nbytes: int) -> None:
        self._lingering += nbytes
        if self._lingering > LINGER_BYTES and self._transport is not None:
            self._transport.close()


def _declared(value: bytes | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 18:
        return None
    return int(value)
