"""Driving wrk with post.lua (which checks every answer) and turning its summary into a row."""

from __future__ import annotations

import json
import resource
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load import checks, procfs
from load.cases import BENCH, Case, Payload, bare_expectation, payload
from load.process import Running


@dataclass
class Measurement:
    server: str
    case: str
    model: str
    samples_per_request: int
    concurrency: int
    requests_per_s: float
    samples_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int  # non-200, socket errors, timeouts and answers with wrong predictions
    requests: int
    wrk_cpu_cores: float
    server_cpu_cores: float
    # The machine's busy cores less server and wrk: other work sharing the machine, and kernel
    # time no process is charged for (loopback softirq).
    other_cpu_cores: float
    # Server CPU (all threads of all its processes) per answered request: what a spinning
    # thread pool or a costly parser cannot hide behind requests/s.
    cpu_us_per_request: float
    golden_max_abs_diff: float | None
    status_codes: dict[str, int] = field(default_factory=dict)


def wrk(url: str, p: Payload, body_file: Path, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk run (one thread); its JSON summary plus ``wrk_cpu_cores``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # NOTE: wrk takes whole seconds only.
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "post.lua"),
        url,
        "--",
        str(body_file),
        p.expect,
        *([] if p.header_length is None else [str(p.header_length)]),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {(out.stdout + out.stderr).strip()[:300]}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["wrk_cpu_cores"] = cpu / (result["duration_us"] / 1e6)
    return result


def prepared(run: Running, case: Case, tmp: Path) -> tuple[str, Payload, Path]:
    """The URL, payload (with the answer this server must give) and body file for a case."""
    p = payload(case)
    if not run.server.samples_in_answer:
        p = Payload(p.body, bare_expectation(), p.header_length)
    body_file = tmp / f"{case.key}.body"
    body_file.write_bytes(p.body)
    return run.base + case.path(), p, body_file


def measure(
    run: Running, case: Case, c: int, seconds: float, warmup: float, tmp: Path, golden: float | None
) -> Measurement:
    url, p, body_file = prepared(run, case, tmp)
    if p.header_length is not None and run.server.checks_outputs:
        checks.v2_golden(url, p, case)
    r = loaded(run, url, p, body_file, c, seconds, warmup)
    return Measurement(
        server=run.server.name,
        case=case.key,
        model=case.model,
        samples_per_request=case.samples,
        concurrency=c,
        requests_per_s=r.requests_per_s,
        samples_per_s=r.requests_per_s * case.samples,
        p50_ms=r.p50_ms,
        p99_ms=r.p99_ms,
        mean_ms=r.mean_ms,
        errors=r.errors,
        requests=r.requests,
        wrk_cpu_cores=r.wrk_cpu_cores,
        server_cpu_cores=r.server_cpu_cores,
        other_cpu_cores=r.other_cpu_cores,
        cpu_us_per_request=r.cpu_us_per_request,
        golden_max_abs_diff=golden,
        status_codes=r.status_codes,
    )


@dataclass(frozen=True)
class Load:
    """What one wrk run saw, and the CPU the server and the rest of the machine spent meanwhile."""

    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    wrk_cpu_cores: float
    server_cpu_cores: float
    other_cpu_cores: float
    status_codes: dict[str, int]

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.server_cpu_cores / self.requests_per_s if self.requests_per_s else 0.0


def loaded(
    run: Running, url: str, p: Payload, body_file: Path, c: int, seconds: float, warmup: float
) -> Load:
    """Warm up, let the server drain, then one measured wrk run with the server's CPU around it."""
    if warmup > 0:
        wrk(url, p, body_file, c, warmup)
        # NOTE: wrk drops its connections with requests in flight; a server may still compute
        # those (and hold their queue rows). Let it drain so the measurement sees steady state.
        time.sleep(0.5)
    cpu0, busy0 = run.cpu_seconds(), procfs.machine_busy_seconds()
    r = wrk(url, p, body_file, c, seconds)
    wall = r["duration_us"] / 1e6
    server_cpu = (run.cpu_seconds() - cpu0) / wall
    busy = (procfs.machine_busy_seconds() - busy0) / wall
    e = r["errors"]
    errors = (
        max(r["bad_answers"], e["status"]) + e["connect"] + e["read"] + e["write"] + e["timeout"]
    )
    lat = r["latency_us"]
    return Load(
        requests=r["requests"],
        requests_per_s=r["requests"] / wall,
        p50_ms=lat["p50"] / 1e3,
        p99_ms=lat["p99"] / 1e3,
        mean_ms=lat["mean"] / 1e3,
        errors=errors,
        wrk_cpu_cores=r["wrk_cpu_cores"],
        server_cpu_cores=server_cpu,
        other_cpu_cores=max(0.0, busy - server_cpu - r["wrk_cpu_cores"]),
        status_codes=r["status_codes"],
    )
