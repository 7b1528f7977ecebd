"""Per-request context: the request id (``X-Request-ID``), the request being answered in this
task (for the log lines written meanwhile), and the access log line.

NOTE: the server (``service.http.server``) gives every request its id, sets it here for the
request's task and writes the access line after the answer, for every route and every refusal
alike. The current request lives in a ``ContextVar``: each request is its own task, so it is never
seen by another request.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from contextvars import ContextVar, Token

from service.http.request import Head, Request

HEADER = b"x-request-id"
MAX_ID_LENGTH = 128
# Printable ASCII without space: what can go back into a header and a log line as it is.
_VALID_ID = re.compile(rb"[!-~]{1,%d}" % MAX_ID_LENGTH)
_PATH_LIMIT = 200  # characters of the path an access line keeps
_ACCESS_LINE = "%s %s %s %.3f ms model=%s version=%s rows=%s client=%s request_id=%s"
ACCESS_LOGGER = "foldserve.access"
access_log = logging.getLogger(ACCESS_LOGGER)


class _Current:
    __slots__ = ("done", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        # NOTE: a task created during the request (say a batcher started by a management call)
        # copies the context and outlives the request: its lines must not carry this id.
        self.done = False


_current: ContextVar[_Current | None] = ContextVar("foldserve_request", default=None)


def current_request_id() -> str | None:
    """The id of the request being answered in this task, if any."""
    current = _current.get()
    return None if current is None or current.done else current.request_id


def enter(request: Request) -> tuple[_Current, Token[_Current | None]]:
    """Make ``request`` the one this task answers (for log lines); give the result to ``leave``."""
    current = _Current(request.request_id.decode("ascii"))
    return current, _current.set(current)


def leave(entered: tuple[_Current, Token[_Current | None]]) -> None:
    current, token = entered
    current.done = True
    _current.reset(token)


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

    def of(self, head: Head) -> bytes:
        """The client's id when it is one (printable ASCII, at most 128 characters), else new."""
        given = head.request_id
        if given is not None and _VALID_ID.fullmatch(given):
            return bytes(given)
        return self.new()


def write_access_line(request: Request, status: int, client: str | None) -> None:
    """One line: never the query string, a header other than the id, or the body."""
    latency_ms = round((time.perf_counter() - request.started) * 1000, 3)
    path = request.path
    if len(path) > _PATH_LIMIT:
        path = path[:_PATH_LIMIT] + "..."
    rows = request.rows
    fields = {
        "request_id": request.request_id.decode("ascii"),
        "method": request.method,
        "path": path,
        "status": status,
        "latency_ms": latency_ms,
        "model": request.model,
        "version": request.version,
        "rows": None if rows is None else (rows.shape[0] if rows.ndim else 0),
        "client": client,
    }
    # NOTE: the path as ascii() when it is not printable: a decoded path may hold a newline
    # (%0A), which must not start a forged line in the text format (JSON escapes it anyway).
    args = (
        request.method,
        path if path.isprintable() else ascii(path),
        status,
        latency_ms,
        fields["model"],
        fields["version"],
        fields["rows"],
        client,
        fields["request_id"],
    )
    # NOTE: the record made directly, not with .info(): no caller lookup (the caller is always
    # this line), a quarter of the cost of an access line.
    record = access_log.makeRecord(
        ACCESS_LOGGER, logging.INFO, __file__, 0, _ACCESS_LINE, args, None, extra=fields
    )
    access_log.handle(record)
