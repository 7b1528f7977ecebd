"""The drift monitors' one background thread: every fold of the process runs here, never on the
event loop (numpy releases the GIL in its heavy kernels, so the loop keeps serving meanwhile).

NOTE (BLAS): when it starts, this thread pins numpy's BLAS to one thread (``service.blas``; the
server does so at start too): the folds' matrix products then run in this thread alone, which
also makes its CPU clock (``time.thread_time``) the whole cost a budget is charged
(``service.drift_budget``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

from service.blas import pin_numpy_blas

log = logging.getLogger(__name__)
Task = Callable[[], None]


class FoldThread:
    """A daemon thread running tasks at their due time, one at a time, in due order; started
    on the first ``submit``. Idle, it sleeps on a condition: no CPU."""

    def __init__(self, name: str = "foldserve-drift") -> None:
        self.name = name
        self._ready = threading.Condition()
        self._due: list[tuple[float, int, Task]] = []
        self._order = itertools.count()  # ties in due time: first submitted, first run
        self._thread: threading.Thread | None = None
        self.native_id: int | None = None  # the OS thread id (/proc/self/task/<id>), once started

    def submit(self, task: Task, delay: float = 0.0) -> None:
        """Run ``task`` in the thread ``delay`` seconds from now; never blocks for long (a lock
        held only to push or pop one entry). A task that raises is logged, the thread goes on."""
        with self._ready:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._order), task))
            self._ready.notify()

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        pin_numpy_blas()
        while True:
            with self._ready:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._ready.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, task = heapq.heappop(self._due)
            try:
                task()
            except Exception:  # a task's bug must not end the thread every monitor relies on
                log.exception("a drift monitoring task failed")


_shared: FoldThread | None = None
_shared_lock = threading.Lock()


def shared() -> FoldThread:
    """The process's fold thread, made on first use (none at import)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = FoldThread()
            # NOTE: a forked child has no thread behind the parent's object (and maybe a lock
            # held by a thread that is gone): it makes its own. --workers spawns, but a fork
            # by anyone else must not leave the child's monitors silently unfolded.
            os.register_at_fork(after_in_child=_forget_shared)
        return _shared


def _forget_shared() -> None:
    global _shared, _shared_lock
    _shared, _shared_lock = None, threading.Lock()
