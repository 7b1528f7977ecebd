"""Our HTTP/1.1 connection policy on top of uvicorn's httptools protocol.

uvicorn bounds only the idle time between requests. Here every connection also has a bound on
the idle time before its first request, on the time to send the headers once a request has begun,
and on the time to send the body once the headers are in: a client that trickles or stalls gets
408 and its connection is closed, instead of holding it for ever.

At a graceful shutdown uvicorn closes idle keep-alive connections at once, and with them any
request the client had already sent that was still in the socket's buffer: the client sees a
reset. Here an idle connection gets a short grace in which such a request is read and answered
(with ``Connection: close``); a busy one is closed after its current answer, as in uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

log = logging.getLogger(__name__)

# NOTE: long enough for a request sent just before the signal to be read from the socket (it is
# usually there already: the loop reads it within a millisecond), short next to a drain.
IDLE_DRAIN_GRACE_S = 0.5


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body timeouts and a drain that loses nothing."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout_s: float,
        body_timeout_s: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timeout_s = header_timeout_s
        self._body_timeout_s = body_timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._draining = False

    # -- connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its keep-alive timer only after a first answer: a connection that never
        # sends anything would stay open for ever.
        self._arm(self.timeout_keep_alive, self._idle_too_long)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self._header_timeout_s, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed: the server is going away
        self._arm(self._body_timeout_s, self._body_too_slow)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def shutdown(self) -> None:
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            self._arm(IDLE_DRAIN_GRACE_S, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    # -- timers

    def _arm(self, seconds: float, handler: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_too_long(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.pipeline:
            self.transport.close()

    def _headers_too_slow(self) -> None:
        self._refuse(f"request headers not received within {self._header_timeout_s:g} s")

    def _body_too_slow(self) -> None:
        if self.flow.read_paused:
            # The app has not read the body yet (a request waiting at the admission gate, see
            # service.admission), so the client is not the slow one: its clock starts again.
            self._arm(self._body_timeout_s, self._body_too_slow)
            return
        self._refuse(f"request body not received within {self._body_timeout_s:g} s")

    def _refuse(self, reason: str) -> None:
        """408 if nothing was answered yet, then close; the app sees the client as gone."""
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            message = f'{{"error": "{reason} (see foldserve serve --help)"}}'.encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: "
                + str(len(message)).encode()
                + b"\r\n\r\n"
                + message
            )
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() now says http.disconnect
            cycle.message_event.set()
        log.info("closing a connection: %s", reason)
        self.transport.close()


def protocol_factory(header_timeout_s: float, body_timeout_s: float) -> Callable[..., Any]:
    """What uvicorn's ``http`` option takes: called with uvicorn's own arguments per connection."""

    def build(*args: Any, **kwargs: Any) -> TimedHttpProtocol:
        return TimedHttpProtocol(
            *args, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s, **kwargs
        )

    return build
