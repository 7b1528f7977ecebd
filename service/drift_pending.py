"""The rows waiting for the fold thread: copied in on the event loop for every answered request,
taken whole by the fold thread (``service.drift``).

NOTE: a buffer of preallocated rows, not a list of the requests' own arrays. Keeping every
request's array alive until the next fold (thousands of small arrays every 50 ms) cost the
request path 10 us each (measured in-process, digits-mlp, one row per request: 78.7 -> 88.4 us;
the allocator's hot memory and numpy's small-array cache stop being reused), where copying a row
in costs 1.5 us. It keeps the first rows observed after each fold (at most ``MAX_ROWS``, or what
``limit_bytes`` holds of the sample size, and for a budgeted monitor at most ``ROWS_PER_S`` a
second), which is all a fold can use anyway; the rest are counted, not copied (at 64 rows a
request, copies that the next rows would only overwrite were most of the monitor's cost on the
request path). Two buffers take turns:
``take`` swaps them under the lock and the fold thread reads the full one outside it.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from service.backends import Array

MAX_ROWS = 2048  # kept for one fold of a budgeted monitor: more than one fold can take
# NOTE: a budgeted monitor keeps at most this many rows a second (a burst of MAX_ROWS first). A
# window of 2,000 samples then turns over within a second under load, which is all a drift score
# needs; each row more cost the request path its copy and the fold thread its arithmetic (at one
# sample a request and 8,000 requests a second, the monitor was a tenth of the server's CPU).
ROWS_PER_S = 1000.0


class PendingRows:
    def __init__(
        self,
        limit_bytes: int,
        max_rows: int | None = MAX_ROWS,
        rows_per_s: float | None = ROWS_PER_S,
    ) -> None:
        """``max_rows`` None: as many rows as ``limit_bytes`` holds; ``rows_per_s`` None: every
        row that fits is kept (both None: every row folded, for tests)."""
        self._limit = limit_bytes
        self._max_rows = max_rows
        self._rate = rows_per_s
        self._credit = float(max_rows or 0)  # rows it may keep now (a token bucket)
        self._refilled = time.monotonic()
        self._lock = threading.Lock()
        self._ring: Array | None = None  # (capacity, *sample shape), made at the first add
        self._spare: Array | None = None
        self._count = 0  # rows kept
        self.observed = 0  # rows given to ``add``, kept or not
        self._scheduled = self._closed = False

    @property
    def bytes(self) -> int:
        ring = self._ring
        return 0 if ring is None else self._count * ring[0].nbytes

    def add(self, rows: Array) -> bool:
        """Copy ``rows`` in (as many as there is room for), unless closed. True when no fold is
        scheduled yet: the caller schedules one."""
        with self._lock:
            if self._closed or not len(rows):
                return False
            self.observed += len(rows)
            ring = self._ring
            if ring is None:
                capacity = max(1, self._limit // max(1, rows[0].nbytes))
                if self._max_rows is not None:
                    capacity = min(capacity, self._max_rows)
                ring = self._ring = np.empty((capacity, *rows.shape[1:]), dtype=np.float32)
            elif ring.shape[1:] != rows.shape[1:]:
                return False  # never for validated rows of one version
            count = self._count
            room = min(len(ring) - count, self._allowed())
            if room > 0:  # else counted only
                n = min(room, len(rows))
                ring[count : count + n] = rows[:n]
                self._count = count + n
                if self._rate is not None:
                    self._credit -= n
            if self._scheduled:
                return False
            self._scheduled = True
            return True

    def _allowed(self) -> int:
        """Rows the rate allows now (under the lock)."""
        if self._rate is None:
            return len(self._ring) if self._ring is not None else 0
        now = time.monotonic()
        cap = float(self._max_rows or 0)
        self._credit = min(cap, self._credit + (now - self._refilled) * self._rate)
        self._refilled = now
        return int(self._credit)

    def take(self, *, scheduled: bool) -> list[Array]:
        """The rows kept, in the order observed (one array, a list for the caller's sake), which
        stay the caller's until its next ``take``. ``scheduled``: taken by the scheduled fold,
        so the next ``add`` schedules another (a flush's fold must not: two would chain for
        ever)."""
        with self._lock:
            if scheduled:
                self._scheduled = False
            ring, count = self._ring, self._count
            if ring is None or count == 0:
                return []
            if self._spare is None:
                self._spare = np.empty_like(ring)
            self._ring, self._spare = self._spare, ring
            self._count = 0
        return [ring[:count]]

    def close(self) -> None:
        """Drop what is kept and keep nothing more."""
        with self._lock:
            self._closed, self._ring, self._spare, self._count = True, None, None, 0
