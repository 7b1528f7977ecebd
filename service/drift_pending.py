"""The rows waiting for the fold thread: added on the event loop for every answered request,
taken whole by the fold thread (``service.drift``).

NOTE: one lock, held only to append to or swap a list: ``add`` never waits for a fold, and a fold
never waits for the loop. The arrays are the requests' own (no copy): they are kept until the
next fold, at most ``limit`` bytes of them, or one request's own array when larger.
"""

from __future__ import annotations

import threading

from service.backends import Array


class PendingRows:
    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._lock = threading.Lock()
        self._arrays: list[Array] = []
        self.bytes = 0
        self.observed = 0  # rows given to ``add``, kept or not
        self._scheduled = self._closed = False

    def add(self, rows: Array) -> bool:
        """Keep ``rows`` for the next fold, unless full (then it is left out) or closed. True
        when no fold is scheduled yet: the caller schedules one."""
        with self._lock:
            if self._closed:
                return False
            self.observed += len(rows)
            if self._arrays and self.bytes + rows.nbytes > self._limit:
                return False
            self._arrays.append(rows)
            self.bytes += rows.nbytes
            if self._scheduled:
                return False
            self._scheduled = True
            return True

    def take(self, *, scheduled: bool) -> list[Array]:
        """Every array kept, oldest first. ``scheduled``: taken by the scheduled fold, so the
        next ``add`` schedules another (a flush's fold must not: two would chain forever)."""
        with self._lock:
            if scheduled:
                self._scheduled = False
            arrays, self._arrays, self.bytes = self._arrays, [], 0
        return arrays

    def close(self) -> None:
        """Drop what is kept and keep nothing more."""
        with self._lock:
            self._closed, self._arrays, self.bytes = True, [], 0
