"""A request as every route sees it: its head, parsed once, and its body as a stream.

The connection fills a ``Request`` as the parser reads the head, keeping the headers a route may
need by name (``Head``) so that nothing scans the header list again; the body arrives later, in
chunks, through ``Body``, which a route reads when (and if) it decides to.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Protocol

from service.errors import FoldserveError

if TYPE_CHECKING:
    import numpy as np

    from service.http.limits import BodyBudget

Headers = list[tuple[bytes, bytes]]

# Headers some route reads, by their lower-case name -> the Head attribute that keeps the first.
KNOWN = {
    b"content-length": "content_length",
    b"content-type": "content_type",
    b"content-encoding": "content_encoding",
    b"origin": "origin",
    b"x-request-id": "request_id",
    b"x-request-timeout": "timeout",
    b"authorization": "authorization",
    b"x-api-key": "api_key",
    b"inference-header-content-length": "inference_header_length",
    b"expect": "expect",
    b"x-forwarded-for": "forwarded_for",
}


class Head:
    """The headers a route may need, each the first value sent (None when absent)."""

    __slots__ = (*KNOWN.values(), "count", "size")

    def __init__(self) -> None:
        self.content_length: bytes | None = None
        self.content_type: bytes | None = None
        self.content_encoding: bytes | None = None
        self.origin: bytes | None = None
        self.request_id: bytes | None = None
        self.timeout: bytes | None = None
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None
        self.inference_header_length: bytes | None = None
        self.expect: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.count = 0  # header fields received
        self.size = 0  # bytes of the request line and fields, as counted against the limit


class BodyFlow(Protocol):
    """What a body asks of its connection: read on (the route wants the bytes) or pause."""

    def want_body(self, body: Body) -> None: ...

    def body_waiting(self, body: Body) -> None: ...


class Body:
    """A request's body as it arrives: chunks fed by the connection, taken by the route.

    NOTE: bytes arriving before the route asks for them are kept (one socket read at most) and
    the connection stops reading: a request waiting at the admission gate holds no more.
    """

    __slots__ = (
        "_budget",
        "_chunks",
        "_complete",
        "_error",
        "_flow",
        "_waiter",
        "buffered",
        "discarding",
        "held",
        "received",
    )

    def __init__(self, flow: BodyFlow | None, budget: BodyBudget | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self._complete = flow is None  # no flow: a request without a body
        self._error: FoldserveError | None = None
        self._flow = flow
        self._waiter: asyncio.Future[None] | None = None
        self._budget = budget
        self.buffered = 0  # bytes fed and not yet taken
        self.received = 0  # bytes fed in all
        self.held = 0  # bytes the route holds against the budget (see ``hold``)
        self.discarding = False  # answered already: the rest is read and dropped

    @property
    def unclaimed(self) -> bool:
        """Bytes arrived that no reader waits for (the route has not asked, or not yet)."""
        return self.buffered > 0 and self._waiter is None

    @property
    def complete(self) -> bool:
        """Every byte of the body has arrived (it may not all have been taken yet)."""
        return self._complete

    # -- the connection's side

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.discarding:
            return
        self._chunks.append(chunk)
        self.buffered += len(chunk)
        if self._waiter is not None:
            self._wake()
        elif self._flow is not None:
            self._flow.body_waiting(self)

    def end(self) -> None:
        self._complete = True
        self._wake()

    def fail(self, error: FoldserveError) -> None:
        """The body will never arrive whole: the client went away, or was too slow."""
        if not self._complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the route's side

    async def next_chunk(self) -> bytes | None:
        """The next chunk of the body, None once it has all been taken."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self.buffered -= len(chunk)
                return chunk
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            if self._flow is not None:
                self._flow.want_body(self)  # may feed at once, settling the waiter
            await waiter

    def take_all(self) -> list[bytes]:
        """Every chunk of a complete body not taken yet, at once (see ``complete``)."""
        assert self._complete, "take_all: the body is still arriving (use next_chunk)"
        chunks = list(self._chunks)
        self._chunks.clear()
        self.buffered = 0
        return chunks

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` the route keeps (the body as read, or decoded) against the budget
        that bodies in flight share; 503 (Overloaded) when it is spent."""
        if self._budget is not None:
            self._budget.take(nbytes)
        self.held += nbytes

    def release(self) -> None:
        """The request is answered: what it held goes back to the budget."""
        if self._budget is not None:
            self._budget.give_back(self.held)
        self.held = 0

    def discard(self) -> None:
        """Drop what is buffered and whatever still arrives: answered without the body."""
        self.discarding = True
        self._chunks.clear()
        self.buffered = 0


class Request:
    """One HTTP request: method, target, headers (names in lower case, as sent otherwise), the
    known ones in ``head``, its body, and what the route served, for the access log."""

    __slots__ = (
        "arrived",
        "body",
        "client",
        "head",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "model",
        "path",
        "query",
        "raw_path",
        "request_id",
        "rows",
        "started",
        "version",
    )

    def __init__(
        self,
        method: str,
        raw_path: bytes,
        path: str,
        query: bytes,
        headers: Headers,
        head: Head,
        *,
        http_version: str = "1.1",
        keep_alive: bool = True,
        client: tuple[str, int] | None = None,
        request_id: bytes = b"",
        started: float = 0.0,
        arrived: float = 0.0,
        body: Body | None = None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.path = path
        self.query = query
        self.headers = headers
        self.head = head
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.client = client
        self.request_id = request_id  # the client's X-Request-ID when valid, else a new one
        self.started = started  # perf_counter() when the head was complete: for latencies
        self.arrived = arrived  # the event loop's time then: deadlines are counted from it
        self.body = body if body is not None else Body(None)
        # What the route served, for the access log (set once resolved; None otherwise).
        self.model: str | None = None
        self.version: int | None = None
        self.rows: np.ndarray | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of any header, by its lower-case name (the known ones: use ``head``)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def served(self, model: str, version: int, rows: np.ndarray | None = None) -> None:
        """Record the model version the request resolved to (and its rows) for the access log."""
        self.model, self.version = model, version
        if rows is not None:
            self.rows = rows
