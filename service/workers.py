"""``--workers N``: N server processes, each accepting from its own socket on the one port.

NOTE: why not uvicorn's own workers: they share one listening socket, and whichever process is
idle when a client connects takes the connection, keep-alive clients then stay with it. Under a
burst of new connections (a load balancer's pool, a load generator) one worker took most of
them while the other idled: two processes served 0.98x what one did in one benchmark run. Here
every worker has its own ``SO_REUSEPORT`` socket and the kernel spreads connections among them by
a hash of their addresses. The supervisor holds every socket for the life of the server, so the
connections queued for a worker that crashed wait for its replacement instead of being reset.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from service.errors import ConfigError
from service.telemetry import pid_alive

log = logging.getLogger(__name__)

# A worker that dies sooner than this after its start failed to start (bad config, port, import);
# restarting it for ever would only fill the log, so a few failures in a row end the server.
_MIN_UPTIME_S = 5.0
_MAX_FAILED_STARTS = 3
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def listening_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """``count`` listening sockets on one address; with port 0 they share the port the first got."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sockets


METRICS_DIR_PREFIX = "foldserve-metrics-"


def metrics_dir_prefix() -> str:
    """The prefix of this server's pooled-metrics folder: it names the supervisor's pid."""
    return f"{METRICS_DIR_PREFIX}{os.getpid()}-"


def sweep_stale_metrics_dirs(parent: Path) -> list[Path]:
    """Remove pooled-metrics folders whose supervisor is gone (killed before it could clean up)."""
    removed = []
    for folder in parent.glob(f"{METRICS_DIR_PREFIX}*-*"):
        owner = folder.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    started: float


class Supervisor:
    """Starts the workers, restarts one that dies, and stops them all on SIGINT or SIGTERM."""

    def __init__(
        self,
        sockets: list[socket.socket],
        *,
        stop_timeout_s: float,
        metrics_dir: Path | None = None,
        target: Callable[..., None] | None = None,
    ) -> None:
        self._sockets = sockets
        self._metrics_dir = metrics_dir
        self._stop_timeout_s = stop_timeout_s
        self._target = target or run_worker
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        # NOTE: a plain flag: a signal handler must not take a lock (threading.Event's would
        # deadlock if the signal lands while this thread holds it inside wait()).
        self._stopping = False
        self._signalled: set[int] = set()  # pids already sent SIGTERM
        self._workers: list[_Worker] = []

    def run(self) -> int:
        """Serve until asked to stop: 0 then; 1 if workers keep failing at start or had to be
        killed at the stop."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        code = 1
        try:
            self._workers = [self._spawn(i) for i in range(len(self._sockets))]
            code = 0 if self._supervise() else 1
        finally:
            if not self._shutdown():
                code = 1
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _supervise(self) -> bool:
        """Restart workers that die until asked to stop; False if they keep failing at start."""
        failed_starts = 0
        while not self._stopping:
            # Wakes as soon as a worker exits (its sentinel), else now and then for the flag.
            wait([w.process.sentinel for w in self._workers], timeout=0.2)
            now = time.monotonic()
            if all(
                w.process.is_alive() and now - w.started >= _MIN_UPTIME_S for w in self._workers
            ):
                failed_starts = 0  # all settled: earlier failures were not "in a row"
            for slot, worker in enumerate(self._workers):
                if self._stopping or worker.process.is_alive():
                    continue
                uptime = now - worker.started
                if uptime < _MIN_UPTIME_S:
                    failed_starts += 1
                log.error(
                    "worker %d (pid %s) exited with code %s after %.1f s",
                    worker.index,
                    worker.process.pid,
                    worker.process.exitcode,
                    uptime,
                )
                if failed_starts >= _MAX_FAILED_STARTS:
                    log.error("workers keep failing at start; stopping (see the log above)")
                    return False
                self._workers[slot] = self._spawn(worker.index)
        return True

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._stopping = True
        # At once, not at the supervising loop's next turn: a worker that has not heard of the
        # stop would take new connections and call itself ready meanwhile.
        self._stop_workers()

    def _on_hangup(self, sig: int, frame: FrameType | None) -> None:
        """SIGHUP: every worker rescans the model store."""
        for worker in self._workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGHUP)

    def _spawn(self, index: int) -> _Worker:
        process = self._context.Process(
            target=self._target,
            args=(self._sockets[index], os.getpid()),
            name=f"foldserve-worker-{index}",
        )
        process.start()
        log.info("worker %d started (pid %s)", index, process.pid)
        return _Worker(index, process, time.monotonic())

    def _stop_workers(self) -> None:
        """Close our sockets and send each live worker one SIGTERM, however often asked.

        NOTE: one signal per worker: a worker started while a stop signal was being handled gets
        its own at the next call; one that got it already is not sent a second.
        """
        # Our copies of the sockets go first: a worker closing its own copy then really closes
        # the socket, so no new connection queues where nobody will accept it.
        for sock in self._sockets:
            sock.close()
        for worker in self._workers:
            pid = worker.process.pid
            if worker.process.is_alive() and pid is not None and pid not in self._signalled:
                self._signalled.add(pid)
                os.kill(pid, signal.SIGTERM)

    def _shutdown(self) -> bool:
        """Stop every worker; False if one had to be killed."""
        self._stop_workers()
        deadline = time.monotonic() + self._stop_timeout_s
        clean = True
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join()
                clean = False
        return clean


def run_worker(sock: socket.socket, parent_pid: int) -> None:
    """One worker process: the app built from FOLDSERVE_* variables, served on ``sock``.

    Its settings say ``load_before_serving``: connections wait in the socket's queue until the
    models are verified, so a worker replacing a crashed one never answers 503 "loading".
    """
    # NOTE: out of the terminal's process group: Ctrl-C reaches the supervisor alone, which
    # sends each worker one SIGTERM. A worker seeing both would take the second signal for
    # the server's "quit now, no drain". The supervisor dying is covered by _die_with_parent.
    os.setpgrp()
    # A signal arriving before the server listens for it ends the worker quietly (nothing to
    # drain yet), sparing a traceback.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _exit_quietly)
    _die_with_parent(parent_pid)
    from service.app import app_from_env
    from service.server import serve

    app = app_from_env()
    serve(app, app.settings, sock)


def _exit_quietly(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM when the supervisor dies, even by SIGKILL; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    # The parent may have died before prctl. (Not "ppid == 1": in a container it may be PID 1.)
    if os.getppid() != parent_pid:
        raise SystemExit(0)
