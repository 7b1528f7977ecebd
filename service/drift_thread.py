"""The drift monitors' one background thread: every fold of the process runs here, never on the
event loop (numpy releases the GIL in its heavy kernels, so the loop keeps serving meanwhile).

NOTE (BLAS): numpy's OpenBLAS runs a matrix product on a pool of one thread per core, and
between calls its threads spin, waiting for the next one; a fold every 50 ms kept one of them
spinning, a whole core burnt while requests flowed. When it starts, this thread pins numpy's
BLAS to one thread with threadpoolctl: process-wide, as OpenBLAS has one setting, which the
server can afford (its own numpy work is small; onnxruntime and torch run models on their own
thread pools, left alone). The folds then run in this thread alone, which also makes its CPU
clock (``time.thread_time``) the whole cost a budget is charged (``service.drift_budget``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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


def pin_numpy_blas() -> list[dict[str, Any]]:
    """Limit numpy's BLAS to one thread (see the module's NOTE); threadpoolctl's description of
    the libraries pinned, as pinned. Another BLAS in the process (a model runtime's) is left
    alone, unless numpy uses a system BLAS outside its package: then every BLAS loaded."""
    from threadpoolctl import ThreadpoolController  # here: the import scans loaded libraries

    controller = ThreadpoolController()
    blas = [info for info in controller.info() if info.get("user_api") == "blas"]
    site = Path(np.__file__).resolve().parent.parent
    numpy_own = [info for info in blas if _inside_numpy(info.get("filepath"), site)]
    chosen = numpy_own or blas
    if not chosen:
        return []
    pinned = controller.select(filepath=[info["filepath"] for info in chosen])
    pinned.limit(limits=1)  # kept: never restored, for the life of the process
    described: list[dict[str, Any]] = pinned.info()
    return described


def _inside_numpy(filepath: object, site: Path) -> bool:
    """A library shipped in numpy's wheel: site-packages/numpy.libs/, numpy/.dylibs/, ..."""
    if not isinstance(filepath, str):
        return False
    path = Path(filepath).resolve()
    return path.is_relative_to(site) and path.relative_to(site).parts[0].startswith("numpy")
