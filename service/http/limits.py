"""The bounds the connection layer enforces, read once from the settings, and the memory budget
that bodies in flight share."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import Overloaded
from service.settings import Settings, setting_ref

# NOTE: a head is counted exactly as its fields complete; this much more (one socket read) is
# what a field still arriving may hold before the guard closes the connection, so a header that
# never ends cannot grow the process (httptools keeps a field whole until it ends).
HEAD_READ_SLACK = 256 << 10


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 65_536
    max_headers: int = 100
    max_body_bytes: int = 64 << 20
    max_body_memory_bytes: int = 256 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 2048
    shutdown_grace_s: float = 30.0

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            max_body_bytes=settings.max_body_bytes,
            max_body_memory_bytes=settings.max_body_memory_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keep_alive_timeout_s=settings.keep_alive_timeout_s,
            max_connections=settings.max_connections,
            shutdown_grace_s=settings.shutdown_grace_s,
        )

    @property
    def connection_cap(self) -> int:
        """Connections past ``max_connections`` still get an answer (503, or a health probe's)
        up to this many; past it they are closed unanswered."""
        return 2 * self.max_connections


class BodyBudget:
    """Bytes of request bodies the routes hold at once (received, or decoded), all connections
    together: past ``max_body_memory_bytes`` a request is refused (503) rather than held.

    NOTE: refused, never made to wait: requests each holding part of their body while waiting
    for more room could wait on one another for ever.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, nbytes: int) -> None:
        if self.held + nbytes > self.limit:
            held_mb = self.held / 1e6
            raise Overloaded(
                f"the server holds {held_mb:.1f} MB of request bodies, the most it may "
                f"({setting_ref('max_body_memory_bytes', self.limit)}): retry shortly",
                reason="body_memory",
            )
        self.held += nbytes

    def give_back(self, nbytes: int) -> None:
        self.held -= nbytes
