"""Per-request context: the request id (``X-Request-ID``), its timing, what the dataplane served,
and the access log line written from them.

NOTE: plain ASGI, applied once in ``FoldserveApp.__call__``, so the raw inference routes, the
FastAPI routes, their errors and the health probes all get the header. The context lives in a
``ContextVar``: each request is its own task in uvicorn, so it is never seen by another request,
and it holds a mutable object so that what the dataplane records below is seen here.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    import numpy as np

HEADER = b"x-request-id"
MAX_ID_LENGTH = 128
# Printable ASCII without space: what can go back into a header and a log line as it is.
_VALID_ID = re.compile(rb"[!-~]{1,%d}" % MAX_ID_LENGTH)
_PATH_LIMIT = 200  # characters of the path an access line keeps
_ACCESS_LINE = "%s %s %s %.3f ms model=%s version=%s rows=%s client=%s request_id=%s"
ACCESS_LOGGER = "foldserve.access"
access_log = logging.getLogger(ACCESS_LOGGER)


class RequestContext:
    """One request's id and start (``perf_counter``), and what is known once it is served."""

    __slots__ = ("done", "model", "raw_id", "rows", "started", "status", "version")

    def __init__(self, raw_id: bytes, started: float) -> None:
        self.raw_id = raw_id
        self.started = started
        self.status: int | None = None
        self.model: str | None = None
        self.version: int | str | None = None
        self.rows: np.ndarray | None = None  # the request's input array; counted when logged
        # NOTE: a task created during the request (say a batcher started by a management call)
        # copies the context and outlives the request: its lines must not carry this id.
        self.done = False

    @property
    def request_id(self) -> str:
        return self.raw_id.decode("ascii")


_current: ContextVar[RequestContext | None] = ContextVar("foldserve_request", default=None)


def current_request_id() -> str | None:
    """The id of the request being answered in this task, if any."""
    context = _current.get()
    return None if context is None or context.done else context.request_id


def note_request(model: str, version: int | str, rows: np.ndarray | None = None) -> None:
    """Record the model version a request resolved to (and its input rows) for the access log.

    ``model`` "" (not resolved) records nothing. Cheap: one attribute write each.
    """
    context = _current.get()
    if context is not None and model:
        context.model, context.version = model, version
        if rows is not None:
            context.rows = rows


class RequestIds:
    """Ids for requests that bring none: a random per-process prefix and a counter.

    NOTE: 0.3 us a request against 3 us for ``uuid4().hex`` here; unique across processes and
    restarts as long as 48 random bits do not collide.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode()
        self._counter = itertools.count(1)

    def new(self) -> bytes:
        return b"%s-%x" % (self._prefix, next(self._counter))

    def of(self, scope: Scope) -> bytes:
        """The client's id when it is one (printable ASCII, at most 128 characters), else new."""
        for name, value in scope["headers"]:
            if name == HEADER:
                if _VALID_ID.fullmatch(value):
                    return bytes(value)
                break
        return self.new()


class RequestLog:
    """Give every HTTP request an id, return it as ``X-Request-ID``, and write the access line.

    ``access_log``: write one line per finished request (``sample``: the fraction of requests
    that get one, drawn at random).
    """

    def __init__(self, access_log: bool = False, sample: float = 1.0) -> None:
        self.ids = RequestIds()
        self.access_log = access_log and sample > 0
        self.sample = sample

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        context = RequestContext(self.ids.of(scope), time.perf_counter())
        token = _current.set(context)
        header = (HEADER, context.raw_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                context.status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        failed = False
        try:
            await app(scope, receive, send_with_id)
        except BaseException:
            failed = True
            raise
        finally:
            context.done = True
            _current.reset(token)
            if (
                self.access_log
                and (self.sample >= 1.0 or random.random() < self.sample)
                and access_log.isEnabledFor(logging.INFO)
            ):
                _write_access_line(scope, context, failed)


def _write_access_line(scope: Scope, context: RequestContext, failed: bool) -> None:
    """One line: never the query string, a header other than the id, or the body."""
    latency_ms = round((time.perf_counter() - context.started) * 1000, 3)
    status = context.status if context.status is not None or not failed else 500
    path: str = scope["path"]
    if len(path) > _PATH_LIMIT:
        path = path[:_PATH_LIMIT] + "..."
    client = scope.get("client")
    version = context.version
    if isinstance(version, str):
        version = int(version) if version.isdigit() else None
    rows = context.rows
    fields: dict[str, Any] = {
        "request_id": context.request_id,
        "method": scope["method"],
        "path": path,
        "status": status,
        "latency_ms": latency_ms,
        "model": context.model,
        "version": version,
        "rows": None if rows is None else (rows.shape[0] if rows.ndim else 0),
        "client": client[0] if client else None,
    }
    # NOTE: the path as ascii() when it is not printable: a decoded path may hold a newline
    # (%0A), which must not start a forged line in the text format (JSON escapes it anyway).
    args = (
        fields["method"],
        path if path.isprintable() else ascii(path),
        status,
        latency_ms,
        fields["model"],
        fields["version"],
        fields["rows"],
        fields["client"],
        fields["request_id"],
    )
    # NOTE: the record made directly, not with .info(): no caller lookup (the caller is always
    # this line), a quarter of the cost of an access line.
    record = access_log.makeRecord(
        ACCESS_LOGGER, logging.INFO, __file__, 0, _ACCESS_LINE, args, None, extra=fields
    )
    access_log.handle(record)
