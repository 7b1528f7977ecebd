"""One hostile client against a fresh foldserve: do eight ordinary clients keep their answers?

Three phases on the same server (default settings, the shipped store): 8 ordinary clients
(digits-mlp, one sample per request, closed loop, ``load.client``) alone; again while one
connection sends ~60 MB JSON bodies in a loop; again while it sends gzip bodies that inflate to
that body (``load.hostile_client``). Per phase: the ordinary clients' answers/s and p99, what the
hostile client got (answers and their statuses), and the server's peak RSS, polled every 10 ms.

Issue 17's targets: the ordinary clients keep >= 80% of their answers/s, their p99 stays under
5x the alone phase's, and the server's RSS stays under 512 MiB (the shipped Kubernetes memory
limit). A server that parses such a body on its event loop before refusing it stalls every other
connection meanwhile; one that inflates it whole holds 60 MB of text and its parse tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from load import checks, overload, procfs
from load.cases import BENCH, PY, Case
from load.process import Running
from load.wrk import prepared

PHASES = ("alone", "json", "gzip")
ORDINARY = 8  # connections of ordinary clients
# NOTE: the ordinary clients wait this long for an answer: a stall shows in their p99 and
# answers/s rather than as give-ups (the overload scenario is where a 1 s deadline applies).
DEADLINE_S = 10.0
RSS_POLL_S = 0.01
PIDS_EVERY_S = 0.5  # the server's processes are listed again this often (a scan of /proc)
RSS_LIMIT_MIB = 512


class PeakRss:
    """The highest RSS of the server's processes (summed) seen while the block runs."""

    def __init__(self, run: Running) -> None:
        self.run = run
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        pids, listed = self.run.pids(), 0
        while not self._stop.wait(RSS_POLL_S):
            listed += 1
            if listed * RSS_POLL_S >= PIDS_EVERY_S:
                pids, listed = self.run.pids(), 0
            self.peak_kib = max(self.peak_kib, sum(procfs.rss_kib(pid)[0] for pid in pids))

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


def scenario(run: Running, seconds: float, warmup: float, tmp: Path) -> dict[str, Any]:
    checks.golden(run, "digits-mlp")
    url, p, body_file = prepared(run, Case("digits-mlp", 1), tmp)
    phases: dict[str, dict[str, Any]] = {}
    for kind in PHASES:
        phases[kind] = phase(run, kind, url, p.expect, body_file, seconds, warmup, tmp)
        if run.proc.poll() is not None:
            phases[kind]["server_exited"] = run.proc.returncode
            break
    return {
        "ordinary_connections": ORDINARY,
        "deadline_s": DEADLINE_S,
        "seconds": seconds,
        "rss_limit_mib": RSS_LIMIT_MIB,
        "phases": phases,
    }


def phase(
    run: Running, kind: str, url: str, expect: str, body_file: Path, seconds: float,
    warmup: float, tmp: Path,
) -> dict[str, Any]:  # fmt: skip
    hostile: subprocess.Popen[str] | None = None
    log = tmp / f"hostile-{kind}.log"
    with PeakRss(run) as rss:
        if kind != "alone":
            hostile = start_hostile(run, kind, warmup + seconds + 1.0, log)
        try:
            ordinary = overload.client(
                run, url, body_file, expect, None, ORDINARY, seconds, warmup, DEADLINE_S
            )
            tally = None if hostile is None else hostile_result(hostile, log)
        finally:
            if hostile is not None and hostile.poll() is None:
                hostile.kill()
                hostile.wait()
        # Inside the poll: the server may still be parsing (or inflating) the last body.
        idle_after_s = overload.wait_idle(run, 20.0)
    return {
        **ordinary,
        "hostile": tally,
        "peak_rss_mib": rss.peak_mib,
        "vm_hwm_mib": procfs.rss_kib(run.proc.pid)[1] / 1024,  # since the server started
        "busy_after_s": idle_after_s,
    }


def start_hostile(run: Running, kind: str, seconds: float, log: Path) -> subprocess.Popen[str]:
    """The hostile client in its own process; returns once its body is built and it starts.

    NOTE: its stderr goes to a file: a pipe nobody reads until the phase ends could fill up
    with asyncio's warnings about writes to a closed connection and block the client.
    """
    argv = [PY, "-m", "load.hostile_client", f"{run.base}/models/digits-mlp/predict"]
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [*argv, "--kind", kind, "-d", str(seconds)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"hostile client did not start: {log.read_text()[-500:]}")
    return proc


def hostile_result(proc: subprocess.Popen[str], log: Path) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    line = next((x for x in out.splitlines() if x.startswith("HOSTILEJSON ")), None)
    if line is None:
        raise RuntimeError(f"hostile client failed: {(out + log.read_text()).strip()[-500:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("HOSTILEJSON "))
    return result


def planned_seconds(seconds: float, warmup: float) -> float:
    """Phases x (body build + client start + load + drain) + the server's start."""
    return len(PHASES) * (seconds + warmup + 4.0) + 10


def phase_line(kind: str, r: dict[str, Any]) -> str:
    """One line of progress per phase, on stdout as the run goes."""
    h = r["hostile"]
    hostile = (
        f"; hostile: {h['answers']} answers {h['statuses']}, {h['lost_without_answer']} lost"
        if h
        else ""
    )
    return (
        f"  {kind:5}: {r['goodput_per_s']:,.0f} answers/s, p99 {r['ok_p99_ms'] or 0:.1f} ms, "
        f"{r['timeouts']} timeouts, peak RSS {r['peak_rss_mib']:.0f} MiB{hostile}"
    )
