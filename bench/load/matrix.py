"""The main matrix: each server alone, every case at every concurrency it runs, with wrk."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load import checks
from load.cases import Case
from load.process import Running
from load.profile import profile
from load.servers import Server
from load.wrk import Measurement, measure


@dataclass
class Matrix:
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ready_s: dict[str, float] = field(default_factory=dict)
    rss: dict[str, float] | None = None  # foldserve's, when ready and after its load runs
    profile: dict[str, Any] | None = None


def plan(server: Server, cases: list[Case], conc: tuple[int, ...]) -> list[tuple[Case, int]]:
    return [
        (case, c)
        for case in cases
        for c in conc
        if (server.cases is None or case.key in server.cases)
        and (server.concurrency is None or c in server.concurrency)
        and (case.protocol == "predict" or server.speaks_v2)
    ]


def run_matrix(
    chosen: list[Server], cases: list[Case], conc: tuple[int, ...], seconds: float,
    warmup: float, deadline: float, profile_s: float | None, tmp: Path,
) -> Matrix:  # fmt: skip
    """Measure until ``deadline`` (time.monotonic()); what does not fit is listed as skipped."""
    out = Matrix()
    for server in chosen:
        todo = plan(server, cases, conc)
        if not todo:
            continue
        if time.monotonic() > deadline:
            out.skipped += [f"{server.name} {case.key} c={c}" for case, c in todo]
            continue
        run = Running(server, tmp)
        try:
            out.ready_s[server.name] = run.wait_ready()
            for model in dict.fromkeys(case.model for case, _ in todo):
                checks.golden(run, model)
            if server.name == "foldserve":
                out.rss = {f"ready_{k}": v for k, v in run.rss_mib().items()}
            for case, c in todo:
                if time.monotonic() + seconds + warmup > deadline:
                    out.skipped.append(f"{server.name} {case.key} c={c}")
                    continue
                golden = checks.golden(run, case.model)  # before each load run
                m = measure(run, case, c, seconds, warmup, tmp, golden)
                out.measurements.append(m)
                print(
                    f"  {m.server:17} {m.case:13} c={c:<3} {m.requests_per_s:8,.0f} req/s "
                    f"{m.samples_per_s:10,.0f} samples/s  p50 {m.p50_ms:7.2f} ms  p99 "
                    f"{m.p99_ms:7.2f} ms  errors {m.errors}  wrk CPU {m.wrk_cpu_cores:.2f}",
                    flush=True,
                )
            if server.name == "foldserve":
                out.rss = {**(out.rss or {}), **run.rss_mib()}
                if profile_s and time.monotonic() + profile_s + 4 < deadline:
                    out.profile = profile(run, Case("digits-mlp", 1), profile_s, tmp)
        except Exception as exc:  # one server failing must not lose the others' results
            print(f"  {server.name}: FAILED: {exc}", flush=True)
            out.skipped += [f"{server.name} {case.key} c={c} ({exc})" for case, c in todo]
        finally:
            run.stop()
    return out
