"""The parts of a run after the main matrix, each on its own servers, bounded by the budget.

Each runner prints its progress, returns its result (None when left out) and lists in
``skipped`` what did not fit in the budget or failed, so one part failing never loses the
others' figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from load import grpc_rest, hostile, overload, paired, real_models, rows64
from load.process import running
from load.real_store import NETWORKS
from load.servers import Server, by_name


@dataclass(frozen=True)
class Plan:
    """How long each part's measurements last; ``bench/run`` and ``--quick`` differ here."""

    rounds: int  # paired rounds
    round_s: float
    overload_times: tuple[float, float, float]  # sweep, warm-up, overload
    rows64_rounds: int
    grpc_rounds: int
    hostile_s: float  # per phase
    real_s: float  # per HTTP run
    real_inprocess_s: float  # per in-process reference
    warmup: float = 1.0

    def seconds(self, part: str, pair: list[str]) -> float:
        """What ``part`` should take, so that the main matrix gets what the others leave."""
        return {
            "paired": paired.planned_seconds(pair, self.rounds, self.round_s),
            "rows64": rows64.planned_seconds(self.rows64_rounds, self.round_s, self.warmup),
            "grpc": grpc_rest.planned_seconds(self.grpc_rounds, self.round_s, self.warmup),
            "overload": overload.planned_seconds(*self.overload_times),
            "hostile": hostile.planned_seconds(self.hostile_s, self.warmup),
            "real": real_models.planned_seconds(self.real_s, self.real_inprocess_s, self.warmup),
        }.get(part, 0.0)


def fits(part: str, planned: float, end: float, skipped: list[str]) -> bool:
    """Start a part only if its plan ends within a minute past the budget."""
    if time.monotonic() + planned > end + 60:
        skipped.append(f"{part} (~{planned:.0f} s: past the budget)")
        return False
    return True


def run_paired(
    pair: list[Server], plan: Plan, tmp: Path, skipped: list[str]
) -> dict[str, Any] | None:
    names = [s.name for s in pair]
    print(f"paired rounds: {plan.rounds} x {names}, mlpx1 c={list(paired.LEVELS)} ...", flush=True)
    try:
        return paired.paired_rounds(pair, plan.rounds, plan.round_s, plan.warmup, tmp)
    except Exception as exc:
        print(f"  paired rounds: FAILED: {exc}", flush=True)
        skipped.append(f"paired rounds ({exc})")
        return None


def run_rows64(plan: Plan, tmp: Path, skipped: list[str]) -> dict[str, Any] | None:
    keys = [c.key for c in rows64.CASES]
    print(
        f"64-row requests: {plan.rows64_rounds} rounds of foldserve and bare, {keys} at "
        f"c={rows64.CONNECTIONS}, with in-process ORT and JSON parse ...",
        flush=True,
    )
    pair = [by_name()[n] for n in rows64.SERVERS]
    try:
        result = rows64.rounds(pair, plan.rows64_rounds, plan.round_s, plan.warmup, tmp)
    except Exception as exc:
        print(f"  64-row requests: FAILED: {exc}", flush=True)
        skipped.append(f"rows64 ({exc})")
        return None
    for key, r in result["cases"].items():
        print(
            f"  {key}: foldserve {r['foldserve_cpu_us_per_request']:.0f} us CPU/request, "
            f"bound {r['bound_us']:.0f} us (bare {r['bare_cpu_us_per_request']:.0f}, ORT 64 "
            f"{r['ort_batch64_us']:.0f}, parse {r['json_parse_us']:.0f})",
            flush=True,
        )
    return result


def run_grpc(plan: Plan, tmp: Path, skipped: list[str]) -> dict[str, Any] | None:
    missing = grpc_rest.available()
    if missing is not None:
        print(f"gRPC against REST: left out: {missing}", flush=True)
        skipped.append(f"grpc ({missing})")
        return None
    print(
        f"gRPC against REST: {plan.grpc_rounds} rounds, rows {list(grpc_rest.ROWS)} at "
        f"c={list(grpc_rest.CONNECTIONS)}, V2 binary (wrk) and ModelInfer (h2load) ...",
        flush=True,
    )
    try:
        result = grpc_rest.rounds(
            by_name()["foldserve"], plan.grpc_rounds, plan.round_s, plan.warmup, tmp
        )
    except Exception as exc:
        print(f"  gRPC against REST: FAILED: {exc}", flush=True)
        skipped.append(f"grpc ({exc})")
        return None
    grpc_rest.print_table(result)
    return result


def run_overload(plan: Plan, tmp: Path, skipped: list[str]) -> dict[str, dict[str, Any]] | None:
    """The overload scenario on a fresh foldserve (one process, defaults)."""
    sweep_s, warmup_s, overload_s = plan.overload_times
    keys = [c.key for c in overload.CASES]
    print(f"overload: {keys}, sweep c={list(overload.SWEEP)}, then {overload.FACTORS}x", flush=True)
    out: dict[str, dict[str, Any]] = {}
    try:
        with running([by_name()["foldserve"]], tmp) as runs:
            for case in overload.CASES:
                s = overload.scenario(runs["foldserve"], case, sweep_s, warmup_s, overload_s, tmp)
                out[case.key] = s
                levels = ", ".join(
                    f"{r['factor']}x c={r['connections']}: {r['goodput_per_s']:,.0f}/s"
                    for r in s["overload"]
                )
                peak = s["peak"]
                print(
                    f"  {case.key}: peak {peak['goodput_per_s']:,.0f}/s at "
                    f"c={peak['concurrency']}; {levels}",
                    flush=True,
                )
    except Exception as exc:
        print(f"  overload: FAILED: {exc}", flush=True)
        skipped.append(f"overload ({exc})")
    return out or None


def run_hostile(plan: Plan, tmp: Path, skipped: list[str]) -> dict[str, Any] | None:
    """On a fresh foldserve: its own process, so earlier parts leave it nothing (RSS, queues)."""
    print(
        f"hostile client: {hostile.ORDINARY} ordinary connections, phases {hostile.PHASES}, "
        f"{plan.hostile_s:g} s each ...",
        flush=True,
    )
    try:
        with running([by_name()["foldserve"]], tmp) as runs:
            result = hostile.scenario(runs["foldserve"], plan.hostile_s, plan.warmup, tmp)
    except Exception as exc:
        print(f"  hostile client: FAILED: {exc}", flush=True)
        skipped.append(f"hostile ({exc})")
        return None
    for kind, r in result["phases"].items():
        print(hostile.phase_line(kind, r), flush=True)
    return result


def run_real(plan: Plan, tmp: Path, skipped: list[str]) -> dict[str, Any] | None:
    names = [n.name for n in NETWORKS]
    print(f"real networks: {names}, in-process ORT, then served at c={real_models.CONNECTIONS}")
    try:
        return real_models.run(plan.real_s, plan.real_inprocess_s, plan.warmup, tmp)
    except Exception as exc:
        print(f"  real networks: FAILED: {exc}", flush=True)
        skipped.append(f"real ({exc})")
        return None
