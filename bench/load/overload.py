"""Goodput under overload: the peak at the best concurrency, then 4x and 16x that concurrency.

Per shipped model, one case sized so that the model does most of the work: digits-cnn with 64
samples per request as JSON (one full batch: ~1.3 ms of onnxruntime against ~0.15 ms of JSON
parsing), and digits-mlp with 1,024 samples per request as V2 binary tensors (16 batches of its
64-row cap, ~0.65 ms of onnxruntime; 256 KiB of raw float32, so little parsing). JSON rows of
digits-mlp would spend 4x more time in the parser than in the model.

``load.client`` drives every run: closed loop, a 1 s deadline after which the client gives up
(closes the connection and opens another), ``X-Request-Timeout: 1`` on every request. Goodput
is the 200s answered within the deadline, per second. A short sweep finds the best concurrency,
the knee where goodput stops rising and only latency grows (see ``knee``); the peak is then
measured there right before and right after the runs at 4x and 16x it, and the overload runs
are compared with the mean of the two.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from load import checks
from load.cases import BENCH, PY, Case
from load.process import Running
from load.wrk import prepared

CASES = (Case("digits-mlp", 1024, "v2bin"), Case("digits-cnn", 64))
SWEEP = (1, 2, 4, 8, 16)
FACTORS = (4, 16)
# Information, no target: the load at which issue 9 saw digits-cnn collapse (wrk -c256).
FIXED = (256,)
DEADLINE_S = 1.0


def client(
    run: Running, url: str, body_file: Path, expect: str, header_length: int | None,
    connections: int, seconds: float, warmup: float, deadline: float = DEADLINE_S,
) -> dict[str, Any]:  # fmt: skip
    """One run of load.client in its own process; its summary plus the server's log growth."""
    argv = [
        PY, "-m", "load.client", url, str(body_file), expect, "-c", str(connections),
        "-d", str(seconds), "--warmup", str(warmup), "--deadline", str(deadline),
        "--cpu-pids", ",".join(map(str, run.pids())),
        *([] if header_length is None else ["--header-length", str(header_length)]),
    ]  # fmt: skip
    log_before = run.log.stat().st_size
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    out = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=warmup + seconds + deadline + 60
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("CLIENTJSON ")), None)
    if line is None:
        raise RuntimeError(f"load client failed: {(out.stdout + out.stderr).strip()[-500:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("CLIENTJSON "))
    # NOTE: the whole run's growth (warm-up included): a log line per refusal shows up here.
    result["server_log_bytes"] = run.log.stat().st_size - log_before
    return result


def wait_idle(run: Running, limit_s: float = 3.0) -> float:
    """Until the server is idle (abandoned requests may still be in its queue); seconds waited."""
    started = time.monotonic()
    while time.monotonic() < started + limit_s:
        cpu = run.cpu_seconds()
        time.sleep(0.2)
        if run.cpu_seconds() - cpu < 0.02:  # under 0.1 of a core
            break
    return time.monotonic() - started


def scenario(
    run: Running, case: Case, sweep_s: float, warmup_s: float, overload_s: float, tmp: Path
) -> dict[str, Any]:
    checks.golden(run, case.model)
    url, p, body_file = prepared(run, case, tmp)
    if p.header_length is not None:
        checks.v2_golden(url, p, case)

    def one(c: int, seconds: float, warmup: float) -> dict[str, Any]:
        result = client(run, url, body_file, p.expect, p.header_length, c, seconds, warmup)
        wait_idle(run)
        return result

    sweep = sweep_both_ways(one, sweep_s, warmup_s / 2)
    best = knee(sweep)
    # NOTE: the machine's speed drifts within minutes: the peak is measured again right before and
    # right after the overload runs, each run as long as theirs; they are compared with the mean.
    before = one(best, overload_s, warmup_s)
    levels = [{**one(f * best, overload_s, warmup_s), "factor": f} for f in FACTORS]
    fixed = [one(c, overload_s, warmup_s) for c in FIXED if c not in (f * best for f in FACTORS)]
    after = one(best, overload_s, warmup_s)
    return {
        "case": case.key,
        "model": case.model,
        "samples_per_request": case.samples,
        "protocol": case.protocol,
        "deadline_s": DEADLINE_S,
        "peak": {
            "concurrency": best,
            "chosen_by": "fewest connections with 90% of the sweep's highest goodput",
            "goodput_per_s": (before["goodput_per_s"] + after["goodput_per_s"]) / 2,
            "ok_p99_ms": _mean(before["ok_p99_ms"], after["ok_p99_ms"]),
            "runs": [before, after],
        },
        "sweep": sweep,
        "overload": levels,
        "fixed": fixed,
    }


def sweep_both_ways(
    one: Callable[[int, float, float], dict[str, Any]], seconds: float, warmup: float
) -> list[dict[str, Any]]:
    """Each concurrency of SWEEP measured going up and again coming down, and the two averaged.

    NOTE: the machine's speed drifts by tens of percent within a minute; a drift that would make
    the last (or first) steps look best cancels out in the average of the two passes.
    """
    up = [one(c, seconds, warmup) for c in SWEEP]
    down = [one(c, seconds, warmup) for c in reversed(SWEEP)][::-1]
    out = []
    for a, b in zip(up, down, strict=True):
        mean = {k: _mean(a[k], b[k]) for k in ("goodput_per_s", "ok_p50_ms", "ok_p99_ms")}
        out.append({"connections": a["connections"], **mean, "passes": [a, b]})
    return out


def knee(sweep: list[dict[str, Any]]) -> int:
    """The best concurrency: the fewest connections with 90% of the sweep's highest goodput.

    Past the knee more connections add only waiting; along the plateau the highest goodput is
    noise, and picking it would make 16x anything from 16 to 256 connections from run to run.
    """
    top = max(float(r["goodput_per_s"]) for r in sweep)
    return int(next(r["connections"] for r in sweep if r["goodput_per_s"] >= 0.9 * top))


def _mean(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a + b) / 2


def planned_seconds(sweep_s: float, warmup_s: float, overload_s: float) -> float:
    """What the scenario takes for all cases, with ~1.5 s of process start and drain a run."""
    per_case = 2 * len(SWEEP) * (sweep_s + warmup_s / 2 + 1.5)
    per_case += (len(FACTORS) + len(FIXED) + 2) * (overload_s + warmup_s + 1.5)
    return len(CASES) * per_case + 10
