"""Load benchmark: foldserve against its baselines, on loopback, every answer checked.

For each server: start it on a free port, wait until it is ready, check the golden inputs against
the manifests' golden outputs (atol 1e-4), then for each case (model x samples per request) and
concurrency: warm up, drive it with wrk for a fixed time (bench/post.lua checks every answer's
predictions), and record requests/s, samples/s, p50/p99, errors, and the CPU that wrk and the
server used. Then paired rounds (foldserve, the bare endpoint, raw ASGI and --workers 2 side by
side, measured in turn at 1, 8 and 64 connections) for the decisive ratios, and the overload
scenario (peak goodput per model, then 4x and 16x its concurrency with a client that gives up
after 1 s). In the same run: in-process onnxruntime (the compute limit), the batcher's cost at
concurrency 1, the RSS of a foldserve process with both models loaded, and a py-spy profile of
foldserve under load. Prints markdown tables and the targets, writes
bench/results/<timestamp>.json and .png. Run it through bench/run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from load import inprocess, overload, paired, report
from load.cases import RESULTS, ROOT, Case
from load.machine import code, loadavg, machine, versions
from load.matrix import Matrix, run_matrix
from load.plot import plot
from load.process import running
from load.servers import by_name, servers
from load.targets import targets

PARTS = ("inprocess", "matrix", "profile", "paired", "overload")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a few minutes: mlp cases, c=1 and 64, 2 s runs")
    add("--duration", type=float, help="seconds of load per measurement (5; quick 2)")
    add("--warmup", type=float, help="seconds of warm-up load before each (1)")
    add("--concurrency", type=int, nargs="+", help="connections (1 8 64; quick 1 64)")
    add("--servers", nargs="+", help="subset of servers to run (main matrix and paired rounds)")
    add(
        "--budget",
        type=float,
        help="seconds for the whole run; what does not fit is skipped and listed (960; quick 400)",
    )
    add("--no-profile", action="store_true", help="skip the py-spy profile (= --skip profile)")
    add(
        "--paired-rounds",
        type=int,
        help="rounds of foldserve, bare, raw ASGI, --workers 2 side by side (5; quick 2; 0: none)",
    )
    add("--skip", nargs="+", choices=PARTS, default=[], help="parts of the run to leave out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    skip = set(args.skip) | ({"profile"} if args.no_profile else set())
    seconds = args.duration or (2.0 if quick else 5.0)
    warmup = args.warmup if args.warmup is not None else 1.0
    conc = tuple(args.concurrency or ((1, 64) if quick else (1, 8, 64)))
    budget = args.budget or (400.0 if quick else 960.0)
    rounds = args.paired_rounds if args.paired_rounds is not None else (2 if quick else 5)
    rounds = 0 if "paired" in skip else rounds
    round_s = 2.0
    overload_times = (1.0, 1.0, 3.0) if quick else (2.0, 1.0, 5.0)  # sweep, warm-up, overload
    cases = [Case("digits-mlp", 1), Case("digits-mlp", 64), Case("digits-mlp", 64, "v2bin")]
    if not quick:
        cases += [Case("digits-cnn", 1), Case("digits-cnn", 64)]
    if shutil.which("wrk") is None:
        print("wrk is not installed: run bench/run (it installs it) or 'apt-get install wrk'")
        return 2
    t0 = time.monotonic()
    # At the start: the server may be edited, and the machine's load change, while the run goes on.
    measured_code, host = code(ROOT), machine()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="foldserve-bench-"))
    print(
        f"# foldserve load benchmark {stamp} ({'quick' if quick else 'full'}; {seconds:g} s per "
        f"measurement, c={list(conc)}, budget {budget:.0f} s; logs in {tmp})\n"
        f"# code {measured_code['commit'][:10]}, uncommitted: "
        f"{measured_code['uncommitted_server_files'] or 'none'} (service/, pyproject.toml)\n"
        f"# load average at the start: {host['loadavg_at_start']} ({host['nproc']} cores)",
        flush=True,
    )
    chosen = [s for s in servers() if not args.servers or s.name in args.servers]
    pair = [s for s in chosen if s.name in paired.SERVERS]
    paired_plan = paired.planned_seconds([s.name for s in pair], rounds, round_s)
    overload_plan = 0.0 if "overload" in skip else overload.planned_seconds(*overload_times)
    # The matrix gets what the paired rounds and the overload scenario leave of the budget.
    matrix_deadline = t0 + budget - paired_plan - overload_plan

    ort: dict[str, dict[str, float]] = {}
    overhead: dict[str, Any] | None = None
    if "inprocess" not in skip:
        print("in-process onnxruntime and batcher ...", flush=True)
        models = list(dict.fromkeys(c.model for c in cases))
        ort = inprocess.onnxruntime(models, 0.5 if quick else 1.5)
        overhead = inprocess.batcher_overhead("digits-mlp", 300 if quick else 1000)

    profile_s = None if "profile" in skip else (5.0 if quick else 8.0)
    matrix = run_matrix(
        [] if "matrix" in skip else chosen, cases, conc, seconds, warmup, matrix_deadline,
        profile_s, tmp,
    )  # fmt: skip
    skipped = matrix.skipped

    rounds_result = None
    if rounds and pair:
        if time.monotonic() + paired_plan > t0 + budget + 60:
            skipped.append(f"paired rounds (~{paired_plan:.0f} s: past the budget)")
        else:
            names = [s.name for s in pair]
            print(
                f"paired rounds: {rounds} x {names}, mlpx1 c={list(paired.LEVELS)} ...", flush=True
            )
            try:
                rounds_result = paired.paired_rounds(pair, rounds, round_s, 1.0, tmp)
            except Exception as exc:
                print(f"  paired rounds: FAILED: {exc}", flush=True)
                skipped.append(f"paired rounds ({exc})")

    scenario: dict[str, dict[str, Any]] | None = None
    if "overload" not in skip:
        if time.monotonic() + overload_plan > t0 + budget + 60:
            skipped.append(f"overload (~{overload_plan:.0f} s: past the budget)")
        else:
            scenario = run_overload(overload_times, tmp, skipped)

    result = targets(matrix.measurements, ort, overhead, matrix.rss, rounds_result, scenario)
    print_report(matrix, ort, overhead, rounds_result, scenario, result)
    if skipped:
        print(f"\nskipped (budget or failure): {skipped}")

    out = {
        "timestamp": stamp,
        "mode": "quick" if quick else "full",
        "command": " ".join(sys.argv),
        "duration_s": seconds,
        "warmup_s": warmup,
        "concurrency": list(conc),
        "machine": {**host, "loadavg_at_end": loadavg()},
        "versions": versions(),
        "code": measured_code,
        "ready_seconds": matrix.ready_s,
        "inprocess_onnxruntime": ort,
        "batcher_overhead": overhead,
        "foldserve_rss_mib": matrix.rss,
        "measurements": [asdict(m) for m in matrix.measurements],
        "paired_rounds": rounds_result,
        "overload": scenario,
        "targets": result,
        "profile": matrix.profile,
        "skipped": skipped,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "servers": {s.name: s.label for s in chosen},
    }
    (RESULTS / f"{stamp}.json").write_text(json.dumps(out, indent=1))
    if matrix.measurements:
        plot(matrix.measurements, RESULTS / f"{stamp}.png")
    if not any("FAILED" in x or "(" in x for x in skipped):
        shutil.rmtree(tmp, ignore_errors=True)  # keep the servers' logs when something failed
    print(f"\nwrote bench/results/{stamp}.json and .png in {out['wall_seconds']:.0f} s")
    return 0


def run_overload(
    times: tuple[float, float, float], tmp: Path, skipped: list[str]
) -> dict[str, dict[str, Any]] | None:
    """The overload scenario on a fresh foldserve (one process, defaults)."""
    sweep_s, warmup_s, overload_s = times
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


def print_report(
    matrix: Matrix, ort: dict[str, dict[str, float]], overhead: dict[str, Any] | None,
    rounds: dict[str, Any] | None, scenario: dict[str, dict[str, Any]] | None,
    result: list[dict[str, Any]],
) -> None:  # fmt: skip
    print("\n## Results (main matrix)\n")
    print(report.results_table(matrix.measurements, ort))
    if overhead:
        print("\n## In-process onnxruntime (1 thread, foldserve's session options)\n")
        print(report.references(ort, overhead, matrix.rss))
    if rounds:
        print(
            "\n## foldserve vs the bare endpoint and raw ASGI (mlpx1, medians of paired rounds)\n"
        )
        print(report.low_concurrency(rounds))
        print("\n## Paired rounds (mlpx1; servers side by side, measured in turn)\n")
        print(report.rounds_table(rounds))
        print(f"\nerrors in the paired rounds: {rounds['errors']}")
    if scenario:
        print("\n## Overload (closed loop, client gives up after 1 s; goodput = 200s in time)\n")
        print(report.overload_table(scenario))
    print("\n## Targets\n")
    print(report.targets_table(result))
    if matrix.profile:
        print("\n## Profile of foldserve under load (event loop thread, % of its samples)\n")
        print(report.profile_text(matrix.profile))
