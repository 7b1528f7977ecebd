"""One server process: foldserve's HTTP server on its socket, with uvloop when installed.

The drain (SIGTERM, SIGINT) is the server's (service.http.server): readiness turns 503 at once,
the listening socket closes, every request already received is answered, then the batchers drain
and the process exits 0 within ``shutdown_grace_s``. A second signal quits at once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from service.app import Service
from service.http.limits import HttpLimits
from service.http.server import HttpServer
from service.settings import Settings
from service.threads import unfinished

log = logging.getLogger(__name__)

BACKLOG = 2048


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def http_server(app: Service, settings: Settings) -> HttpServer:
    """The server exactly as ``foldserve serve`` runs it (tests run this one too)."""
    return HttpServer(
        app, HttpLimits.of(settings), access_log=app.access_log, budget=app.body_budget
    )


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if importlib.util.find_spec("uvloop") is None:
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def serve(app: Service, settings: Settings, sock: socket.socket | None = None) -> None:
    """Run ``app`` until a signal, then drain; on ``sock`` if given (a worker's own socket)."""
    own = sock is None
    sock = listening_socket(settings.host, settings.port) if sock is None else sock
    if threading.current_thread() is threading.main_thread():
        # SIGHUP means "rescan the store" once the models are loaded; until the app listens for
        # it, its default action (end the process) must not apply.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = http_server(app, settings)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(server.serve([sock]))
    finally:
        if own:
            sock.close()
    left = unfinished()
    if left:
        # NOTE: a model still being loaded runs native code (onnxruntime) in its thread; letting
        # the interpreter finalize around it can abort the process (SIGABRT). Everything that
        # was accepted has been answered: end the process here.
        log.info("exiting with %d model loads unfinished (%s)", len(left), ", ".join(left))
        logging.shutdown()
        os._exit(0)


def run_in_thread(app: Service, settings: Settings, sock: socket.socket) -> tuple[HttpServer, Any]:
    """Start the server in a thread (tests): returns it and the thread; stop with
    ``server.request_stop()`` and join the thread."""
    server = http_server(app, settings)

    def main() -> None:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(server.serve([sock]))

    thread = threading.Thread(target=main, name="foldserve-server", daemon=True)
    thread.start()
    return server, thread
