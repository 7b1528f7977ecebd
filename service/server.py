"""One server process: uvicorn with our connection policy and a drain that exits 0.

On SIGTERM or SIGINT: readiness turns 503 at once (a load balancer stops sending), the listening
socket closes (new connections are refused), every request already received is answered, idle
keep-alive connections get a short grace for requests already on their way, then the batchers
drain and the process exits 0 within ``shutdown_grace_s``. A second SIGINT quits at once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import signal
import socket
import threading
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

import uvicorn

from service.http_protocol import protocol_factory
from service.logs import uvicorn_log_config
from service.settings import Settings

log = logging.getLogger(__name__)

_HANDLED = (signal.SIGINT, signal.SIGTERM)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options from the settings; the same for one process and for each worker."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # NOTE: foldserve writes its own access log (service.request_context: with the request
        # id, model and latency, never the query string); uvicorn's stays off.
        "access_log": False,
        "log_config": uvicorn_log_config(settings.log_format),
        "proxy_headers": settings.proxy_headers,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "limit_concurrency": settings.max_connections,
    }
    if importlib.util.find_spec("httptools"):
        options["http"] = protocol_factory(settings.header_timeout_s, settings.body_timeout_s)
    else:  # uvicorn's pure-Python parser: no header or body timeouts, so say so
        log.warning(
            "httptools is not installed: header_timeout_s and body_timeout_s are not enforced"
        )
        options["http"] = "h11"
    return options


class DrainingServer(uvicorn.Server):
    """uvicorn's server that reports the drain at the signal and exits normally after it.

    NOTE: uvicorn re-raises the signal once it has drained, so the process dies "killed by
    SIGTERM" (exit -15) even after a clean drain; an orchestrator reads that as a crash.
    """

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_drain = on_drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_drain()
            log.info("signal %s: draining (readiness is now 503)", signal.Signals(sig).name)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _HANDLED}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(
    app: Any, settings: Settings, on_drain: Callable[[], None], sock: socket.socket | None = None
) -> None:
    """Run ``app`` until a signal, then drain; on ``sock`` if given (a worker's own socket)."""
    config = uvicorn.Config(app, **uvicorn_options(settings))
    if threading.current_thread() is threading.main_thread():
        # SIGHUP means "rescan the store" once the models are loaded; until the app listens for
        # it, its default action (end the process) must not apply.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    DrainingServer(config, on_drain).run(sockets=None if sock is None else [sock])
