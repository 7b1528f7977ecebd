"""The decisive ratios, measured with the servers side by side, in turn, round after round.

NOTE: this machine's speed drifts by tens of percent within minutes, and the main matrix measures
each server minutes apart. Here the servers are up side by side (an idle server costs nothing)
and measured in turn, at each concurrency in a rotating order, so each round compares servers
seconds apart; the median of the per-round ratios is what the targets use.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from load.cases import Case
from load.process import running
from load.servers import Server
from load.wrk import Measurement, measure

SERVERS = ("foldserve", "bare", "raw-asgi", "foldserve-w2")
LEVELS = (1, 8, 64)  # connections; digits-mlp, one sample per request
ONLY_AT = {"foldserve-w2": (64,)}  # the two-worker question is asked at 64 connections only


def paired_rounds(
    servers: list[Server], rounds: int, seconds: float, warmup: float, tmp: Path
) -> dict[str, Any]:
    case = Case("digits-mlp", 1)
    per: dict[str, dict[int, list[Measurement]]] = {s.name: {} for s in servers}
    with running(servers, tmp) as runs:
        for r in range(rounds):
            for c in LEVELS:
                names = [n for n in runs if c in ONLY_AT.get(n, LEVELS)]
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    m = measure(runs[name], case, c, seconds, warmup, tmp, None)
                    per[name].setdefault(c, []).append(m)
    ratios = per_round_ratios(per)
    return {
        "rounds": rounds,
        "seconds": seconds,
        "levels": list(LEVELS),
        "errors": sum(m.errors for by_c in per.values() for ms in by_c.values() for m in ms),
        "measurements": {
            name: {str(c): [asdict(m) for m in ms] for c, ms in by_c.items()}
            for name, by_c in per.items()
        },
        "median_of_rounds": {
            name: {str(c): medians(ms) for c, ms in by_c.items()} for name, by_c in per.items()
        },
        "ratios": ratios,
        "median": {k: statistics.median(v) for k, v in ratios.items()},
    }


def planned_seconds(names: list[str], rounds: int, seconds: float) -> float:
    """Rounds x measurements x (load + 1 s of warm-up + 0.5 s of drain + wrk's start) + starts."""
    per_round = sum(len([n for n in names if c in ONLY_AT.get(n, LEVELS)]) for c in LEVELS)
    return rounds * per_round * (seconds + 1.6) + (15 if rounds else 0)


def medians(ms: list[Measurement]) -> dict[str, float]:
    return {
        f: statistics.median(getattr(m, f) for m in ms)
        for f in (
            "requests_per_s", "p50_ms", "p99_ms", "server_cpu_cores", "cpu_us_per_request",
            "other_cpu_cores",
        )
    }  # fmt: skip


def per_round_ratios(per: dict[str, dict[int, list[Measurement]]]) -> dict[str, list[float]]:
    """Each ratio once per round, from measurements seconds apart; absent servers give none."""

    def pairs(a: str, ca: int, b: str, cb: int) -> list[tuple[Measurement, Measurement]] | None:
        if ca not in per.get(a, {}) or cb not in per.get(b, {}):
            return None
        return list(zip(per[a][ca], per[b][cb], strict=True))

    out: dict[str, list[float]] = {}
    for c in LEVELS:
        for other, key in (("bare", "bare"), ("raw-asgi", "raw_asgi")):
            if (ps := pairs("foldserve", c, other, c)) is not None:
                out[f"foldserve_vs_{key}_rps_c{c}"] = [
                    a.requests_per_s / b.requests_per_s for a, b in ps
                ]
    for c in LEVELS:
        # Issue 17: CPU per answer, the cost req/s hides when a spinning pool has idle cores.
        if (ps := pairs("foldserve", c, "bare", c)) is not None:
            out[f"foldserve_vs_bare_cpu_per_request_c{c}"] = [
                a.cpu_us_per_request / b.cpu_us_per_request for a, b in ps
            ]
    if (ps := pairs("foldserve", 64, "bare", 64)) is not None:
        out["foldserve_vs_bare_p99_c64"] = [a.p99_ms / b.p99_ms for a, b in ps]
    for c in LEVELS:
        if (ps := pairs("foldserve", c, "bare", c)) is not None:
            out[f"foldserve_minus_bare_p50_ms_c{c}"] = [a.p50_ms - b.p50_ms for a, b in ps]
    if (ps := pairs("foldserve", 8, "foldserve", 1)) is not None:
        out["foldserve_c8_vs_c1_rps"] = [a.requests_per_s / b.requests_per_s for a, b in ps]
    if (ps := pairs("foldserve-w2", 64, "foldserve", 64)) is not None:
        out["w2_vs_foldserve_rps_c64"] = [a.requests_per_s / b.requests_per_s for a, b in ps]
    return out
