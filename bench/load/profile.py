"""py-spy on foldserve while wrk drives it: where the event loop's time goes, by layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from load.cases import BIN, ROOT, Case
from load.process import Running
from load.wrk import prepared, wrk


def profile(run: Running, case: Case, seconds: float, tmp: Path) -> dict[str, Any] | None:
    """py-spy (sampling, non-blocking) on the server process while wrk drives it at c=64."""
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if pyspy is None:
        return None
    raw = tmp / "profile.txt"
    url, p, body_file = prepared(run, case, tmp)
    # fmt: off
    spy = subprocess.Popen(
        [pyspy, "record", "--pid", str(run.proc.pid), "--duration", str(int(seconds)),
         "--rate", "200", "--nonblocking", "--threads", "--format", "raw", "-o", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    # fmt: on
    time.sleep(0.5)
    load = wrk(url, p, body_file, 64, seconds)
    _, err = spy.communicate(timeout=seconds + 30)
    if not raw.exists():
        print(f"py-spy failed: {err[-300:]}", file=sys.stderr)
        return None
    return summarize(raw.read_text(), load)


def _frame_name(frame: str) -> tuple[str, str, str]:
    """'func (path/to/file.py:123)' -> ('func (file.py)', 'func (file.py:123)', 'file.py')."""
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})", f"{name} ({path}:{line})", path


_LAYERS = (  # (path prefix, layer); the first match of a sample's leaf frame wins
    ("service/", "foldserve code (service/, incl. the C calls its lines make)"),
    ("fastapi/", "FastAPI (routing, dependencies, middleware)"),
    ("starlette/", "Starlette (routing, middleware, Request/Response)"),
    ("uvicorn/", "uvicorn (HTTP protocol, send/receive)"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("asyncio/", "asyncio (tasks, futures, timeouts)"),
    ("numpy/", "numpy (Python part)"),
    ("concurrent/", "executor hand-off (concurrent.futures)"),
)


def summarize(text: str, load: dict[str, Any], top: int = 25) -> dict[str, Any]:
    """Shares of the event-loop thread's samples: by layer and function (self) and inclusive."""
    threads: Counter[str] = Counter()
    layer: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    loop_total = total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        thread_name = thread.partition(": ")[2] or thread  # "thread (pid): MainThread"
        threads[thread_name] += n
        total += n
        if thread_name != "MainThread" or not frames:
            continue
        loop_total += n
        names = [_frame_name(f) for f in frames]
        fn, full, path = names[-1]
        self_fn[fn] += n
        layer[next((label for prefix, label in _LAYERS if path.startswith(prefix)), "other")] += n
        if path.startswith("service/"):
            self_line[full] += n
        for f in {f for f, _, _ in names}:
            incl_fn[f] += n

    def pct(counter: Counter[str], denom: int) -> list[list[Any]]:
        return [[k, round(100 * v / max(denom, 1), 1)] for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "note": "percent of the event-loop (MainThread) samples unless stated; py-spy record "
        "--nonblocking --threads at 200 Hz; C calls (orjson, numpy, onnxruntime) count at "
        "the Python line that makes them",
        "load_requests_per_s": load["requests"] / (load["duration_us"] / 1e6),
        "threads_pct_of_all": pct(threads, total),
        "loop_by_layer": pct(layer, loop_total),
        "loop_self_by_service_line": pct(self_line, loop_total),
        "loop_self_by_function": pct(self_fn, loop_total),
        "loop_inclusive_by_function": pct(incl_fn, loop_total),
    }
