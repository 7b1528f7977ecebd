"""How many rows a monitored layer may fold so that it spends at most a share of one core.

A token bucket of CPU seconds: the credit grows by ``share`` per second of wall time, up to
``share * BURST_S``; every fold is charged the CPU time it measured (the fold thread's own, so
other threads' work is never counted). A layer takes rows while its credit is positive, sized by
its measured cost per row, so over any stretch of time it spends at most ``share`` of a core
plus one burst and one chunk. What a row costs (digits-mlp: a microsecond; a ResNet-50 stem's
7x7 convolution over 112x112 positions: milliseconds) sets how many rows are taken, never the
bound.
"""

from __future__ import annotations

import math
import time

BURST_S = 1.0  # the credit saved while idle: at most this many seconds' worth of the share
_KEEP = 0.7  # of the past measurements at each fold: the cost per row follows a change in a few


class CpuBudget:
    """One layer's token bucket; used by the fold thread only."""

    def __init__(self, share: float, clock: float | None = None) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"a CPU budget is a share of one core in (0, 1], not {share}")
        self.share = share
        self._credit = share * BURST_S  # seconds of CPU it may spend now
        self._refilled = time.monotonic() if clock is None else clock
        self._seconds, self._rows = 0.0, 0.0  # decayed sums of the folds' measurements

    def rows(self, available: int, now: float | None = None) -> int:
        """How many of ``available`` rows to fold now: none while the credit is spent, one to
        measure a layer never timed, then as many as the credit pays for (at least one)."""
        now = time.monotonic() if now is None else now
        cap = self.share * BURST_S
        self._credit = min(cap, self._credit + self.share * max(0.0, now - self._refilled))
        self._refilled = now
        if available <= 0 or self._credit <= 0:
            return 0
        cost = self.seconds_per_row
        if cost is None:
            return 1
        # NOTE: at least one row while in credit, even a row dearer than the whole burst (a
        # large image through a large map): the debt it leaves is paid back before the next.
        affordable = math.floor(self._credit / max(cost, 1e-9))
        return max(1, min(available, affordable))

    @property
    def seconds_per_row(self) -> float | None:
        """Measured, weighted by rows (a one-row fold's fixed costs do not rule it); None
        before the first fold."""
        return self._seconds / self._rows if self._rows > 0 else None

    def debit(self, seconds: float) -> None:
        """Debit a fold's fixed costs (its share of them), which no row caused."""
        self._credit -= seconds

    def charge(self, seconds: float, rows: int) -> None:
        """Debit what folding ``rows`` rows measured, and learn the cost per row from it."""
        self._credit -= seconds
        self._seconds = self._seconds * _KEEP + seconds
        self._rows = self._rows * _KEEP + rows
