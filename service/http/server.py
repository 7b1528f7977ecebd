"""The server: listen, hand each connection its limits, answer through the application, drain.

On stop (SIGTERM, SIGINT, or ``request_stop``): the application is told (readiness turns 503),
the listening sockets close (new connections are refused), every request already received is
answered (those waiting for admission included), idle keep-alive connections get a moment for a
request already on its way, and after ``shutdown_grace_s`` at most the rest are closed; then the
application shuts down (its batchers answer what they hold) and ``serve`` returns. A second
signal ends the process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol

from service.http.connection import Connection
from service.http.context import RequestIds, enter, leave
from service.http.limits import BodyBudget, HttpLimits
from service.http.request import Head, Request
from service.http.response import Response, error_response

log = logging.getLogger(__name__)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How often connections' timers are checked: a timeout fires at most this late.
SWEEP_S = 0.1


class Application(Protocol):
    """What the server serves: ``service.app.Service``, or a test's own."""

    async def startup(self) -> None:
        """Before the first connection is accepted (models may go on loading after it)."""

    def handle(self, request: Request, over_limit: bool) -> Awaitable[Response]:
        """Answer one request (an ``async def`` will do); errors are the application's to
        render (anything raised is a 500 with an id to find it in the log). ``over_limit``:
        the connection is past ``max_connections``: answer a health probe, refuse the rest."""
        ...

    def start_draining(self) -> None:
        """The server stops: readiness should say so from now on."""

    def eager(self, request: Request) -> bool:
        """Whether ``handle`` may start in the connection's own call, before any task exists
        (service.http.eager): code that needs a current task (anyio's, Starlette's) must not."""
        ...

    async def shutdown(self) -> None:
        """After the last connection: stop background work, answer what is queued."""


class AccessLog(Protocol):
    def __call__(self, request: Request, status: int) -> None: ...


class HttpServer:
    def __init__(
        self,
        app: Application,
        limits: HttpLimits,
        *,
        access_log: AccessLog | None = None,
        budget: BodyBudget | None = None,  # shared with the gRPC service, when one runs
    ) -> None:
        self.app = app
        self.limits = limits
        self.budget = budget if budget is not None else BodyBudget(limits.max_body_memory_bytes)
        self.draining = False
        self.started = False  # accepting connections (tests wait for it)
        self._ids = RequestIds()
        self._access_log = access_log
        self._connections: set[Connection] = set()
        self._all_closed: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = 0

    # -- what connections call (service.http.connection.Site)

    def opened(self, connection: Connection) -> int:
        self._connections.add(connection)
        return len(self._connections)

    def closed(self, connection: Connection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    def request_id(self, head: Head) -> bytes:
        return self._ids.of(head)

    def eager(self, request: Request) -> bool:
        return self.app.eager(request)

    async def answer(self, request: Request, over_limit: bool) -> Response:
        entered = enter(request)
        status = 500
        try:
            response = await self.app.handle(request, over_limit)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away; nobody reads an answer
            raise
        except Exception as exc:
            error_id = os.urandom(4).hex()
            where = f"{request.method} {request.path[:200]!r}"
            log.error("unexpected error %s in %s", error_id, where, exc_info=exc)
            return error_response(500, f"internal error {error_id}: see the server log")
        finally:
            if self._access_log is not None:
                self._access_log(request, status)
            leave(entered)

    # -- running

    def request_stop(self) -> None:
        """Start the drain; safe from any thread (tests call it from theirs)."""
        loop = self._loop
        if loop is not None and self._stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stop.set)  # a second call, once stopped: nothing

    async def serve(self, sockets: list[socket.socket]) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._all_closed = asyncio.Event()
        handled = self._listen_for_signals(loop)
        try:
            if not await self._until_stop(self.app.startup()):
                await self.app.shutdown()
                return
            servers = [
                await loop.create_server(lambda: Connection(self), sock=sock, backlog=2048)
                for sock in sockets
            ]
            self.started = True
            sweeping = asyncio.ensure_future(self._sweep())
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                log.info("foldserve listening on http://%s:%d (pid %d)", host, port, os.getpid())
            await self._stop.wait()
            await self._drain(servers)
            sweeping.cancel()
            await self.app.shutdown()
            log.info("drained and stopped (pid %d)", os.getpid())
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def _until_stop(self, startup: Coroutine[Any, Any, None]) -> bool:
        """Run the application's startup; False when a stop came first (it was cancelled)."""
        assert self._stop is not None
        task = asyncio.ensure_future(startup)
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            stop.cancel()
            task.result()  # a failing startup fails the server
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("stopped while starting up")
        return False

    async def _drain(self, servers: list[asyncio.Server]) -> None:
        assert self._all_closed is not None
        self.draining = True
        self.app.start_draining()
        for server in servers:
            server.close()  # no new connections
        busy = sum(1 for c in self._connections if not c.idle)
        log.info(
            "draining: %d connections open, %d with a request in progress (at most %g s)",
            len(self._connections),
            busy,
            self.limits.shutdown_grace_s,
        )
        for connection in list(self._connections):
            connection.drain()
        if self._connections:
            self._all_closed.clear()  # set whenever the last connection closed, long before
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), self.limits.shutdown_grace_s)
        if self._connections:
            log.warning(
                "shutdown_grace_s (%g s) passed: closing %d connections still open",
                self.limits.shutdown_grace_s,
                len(self._connections),
            )
            for connection in list(self._connections):
                connection.abort()

    async def _sweep(self) -> None:
        """Every connection's timer, checked a few times a second (see Connection._arm)."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        shortest = min(limits.header_timeout_s, limits.body_timeout_s, limits.keep_alive_timeout_s)
        every = min(SWEEP_S, shortest / 4)
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for connection in list(self._connections):
                connection.check_deadline(now)

    def _listen_for_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []  # a server run in a thread (tests) is stopped with request_stop
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        return list(_STOP_SIGNALS)

    def _on_signal(self, sig: int) -> None:
        self._signalled += 1
        name = signal.Signals(sig).name
        if self._signalled > 1:
            log.warning("signal %s again: exiting now, without finishing the drain", name)
            os._exit(1)
        log.info("signal %s: draining (readiness is now 503)", name)
        assert self._stop is not None
        self._stop.set()
