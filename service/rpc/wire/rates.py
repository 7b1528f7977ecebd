"""How often a client may send the frames that cost the server work and give it nothing back:
stream resets (the rapid-reset attack, CVE-2023-44487), PINGs and SETTINGS (floods). Past its
bucket a connection ends with ENHANCE_YOUR_CALM."""

from __future__ import annotations


class Bucket:
    """Up to ``burst`` events at once, and ``per_s`` more each second after that."""

    __slots__ = ("_at", "_burst", "_per_s", "_tokens")

    def __init__(self, burst: float, per_s: float, now: float) -> None:
        self._burst = burst
        self._per_s = per_s
        self._tokens = burst
        self._at = now

    def take(self, now: float) -> bool:
        """Count one event; False once the client is past its rate."""
        tokens = min(self._burst, self._tokens + (now - self._at) * self._per_s)
        self._at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


# NOTE: generous for clients that cancel calls (a deadline, a user gone) and keep connections
# alive with pings; nghttp2 allows 1,000 resets at once and 33 a second.
RESETS = (1000.0, 100.0)
PINGS = (100.0, 10.0)
SETTINGS = (100.0, 10.0)
