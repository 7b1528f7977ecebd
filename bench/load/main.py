"""Load benchmark: foldserve against its baselines, on loopback, every answer checked.

For each server: start it on a free port, wait until it is ready, check the golden inputs against
the manifests' golden outputs (atol 1e-4), then for each case (model x samples per request) and
concurrency: warm up, drive it with wrk for a fixed time (bench/post.lua checks every answer's
predictions), and record requests/s, samples/s, p50/p99, errors, and the CPU that wrk and the
server used. Then paired rounds (foldserve, the bare endpoint, raw ASGI and --workers 2 side by
side, measured in turn at 1, 8 and 64 connections) for the decisive ratios, server CPU per
request included; 64-row requests against their CPU bound; the overload scenario (peak goodput
per model, then 4x and 16x its concurrency with a client that gives up after 1 s); one hostile
client sending ~60 MB bodies beside 8 ordinary ones; and two real networks (MONAI ResNet-50 and
UNet) served against onnxruntime in-process. In the same run: in-process onnxruntime (the
compute limit), the batcher's cost at concurrency 1, the RSS of a foldserve process with both
models loaded, and a py-spy profile of foldserve under load. Prints markdown tables and the
targets, writes bench/results/<timestamp>.json and .png. Run it through bench/run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from load import inprocess, paired, parts
from load.cases import RESULTS, ROOT, Case
from load.machine import code, loadavg, machine, versions
from load.matrix import run_matrix
from load.plot import plot
from load.servers import servers
from load.summary import Results, print_report
from load.targets import targets

PARTS = (
    "inprocess", "matrix", "profile", "paired", "rows64", "grpc", "overload", "hostile", "real",
)  # fmt: skip
# After the matrix, in this order; the matrix gets what these leave of the budget.
LATER = ("paired", "rows64", "grpc", "overload", "hostile", "real")


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
        help="seconds for the whole run; what does not fit is skipped and listed (1500; quick "
        "480); the first run also exports the real networks once (minutes, outside the budget)",
    )
    add("--no-profile", action="store_true", help="skip the py-spy profile (= --skip profile)")
    add(
        "--paired-rounds",
        type=int,
        help="rounds of foldserve, bare, raw ASGI, --workers 2 side by side (5; quick 2; 0: none)",
    )
    add("--skip", nargs="+", choices=PARTS, default=[], help="parts of the run to leave out")
    add("--only", nargs="+", choices=PARTS, help="run these parts alone (while developing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    skip = set(args.skip) | ({"profile"} if args.no_profile else set())
    if args.only:
        skip |= set(PARTS) - set(args.only)
    seconds = args.duration or (2.0 if quick else 5.0)
    warmup = args.warmup if args.warmup is not None else 1.0
    conc = tuple(args.concurrency or ((1, 64) if quick else (1, 8, 64)))
    budget = args.budget or (480.0 if quick else 1500.0)
    rounds = args.paired_rounds if args.paired_rounds is not None else (2 if quick else 5)
    plan = parts.Plan(
        rounds=0 if "paired" in skip else rounds,
        round_s=2.0,
        overload_times=(1.0, 1.0, 3.0) if quick else (2.0, 1.0, 5.0),
        rows64_rounds=1 if quick else 3,
        grpc_rounds=1 if quick else 2,
        hostile_s=4.0 if quick else 8.0,
        real_s=3.0 if quick else 5.0,
        real_inprocess_s=2.0 if quick else 5.0,
        warmup=warmup,
    )
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
        f"# load average at the start: {host['loadavg_at_start']} ({host['nproc']} cores)"
        + (f"\n# parts left out: {sorted(skip)}" if skip else ""),
        flush=True,
    )
    chosen = [s for s in servers() if not args.servers or s.name in args.servers]
    pair = [s for s in chosen if s.name in paired.SERVERS]
    later = [p for p in LATER if p not in skip and (p != "paired" or (plan.rounds and pair))]
    planned = {p: plan.seconds(p, [s.name for s in pair]) for p in later}
    end = t0 + budget

    ort: dict[str, dict[str, float]] = {}
    overhead: dict[str, Any] | None = None
    if "inprocess" not in skip:
        print("in-process onnxruntime and batcher ...", flush=True)
        models = list(dict.fromkeys(c.model for c in cases))
        ort = inprocess.onnxruntime(models, 0.5 if quick else 1.5)
        overhead = inprocess.batcher_overhead("digits-mlp", 300 if quick else 1000)

    profile_s = None if "profile" in skip else (5.0 if quick else 8.0)
    matrix = run_matrix(
        [] if "matrix" in skip else chosen, cases, conc, seconds, warmup,
        end - sum(planned.values()), profile_s, tmp,
    )  # fmt: skip
    results = Results(matrix, ort, overhead)
    skipped = matrix.skipped
    runners: dict[str, Callable[[], Any]] = {
        "paired": lambda: parts.run_paired(pair, plan, tmp, skipped),
        "rows64": lambda: parts.run_rows64(plan, tmp, skipped),
        "grpc": lambda: parts.run_grpc(plan, tmp, skipped),
        "overload": lambda: parts.run_overload(plan, tmp, skipped),
        "hostile": lambda: parts.run_hostile(plan, tmp, skipped),
        "real": lambda: parts.run_real(plan, tmp, skipped),
    }
    for part in later:
        # What the parts after this one still need stays reserved for them.
        rest = sum(planned[p] for p in later[later.index(part) + 1 :])
        if parts.fits(part, planned[part], end - rest, skipped):
            setattr(results, part, runners[part]())

    r = results
    result = targets(
        r.matrix.measurements, r.ort, r.overhead, r.matrix.rss, r.paired, r.overload,
        r.rows64, r.hostile, r.real, r.grpc,
    )  # fmt: skip
    print_report(results, result)
    if skipped:
        print(f"\nskipped (budget or failure): {skipped}")

    out = {
        "timestamp": stamp,
        "mode": "quick" if quick else "full",
        "command": " ".join(sys.argv),
        "duration_s": seconds,
        "warmup_s": warmup,
        "concurrency": list(conc),
        "parts_left_out": sorted(skip),
        "machine": {**host, "loadavg_at_end": loadavg()},
        "versions": versions(),
        "code": measured_code,
        "ready_seconds": r.matrix.ready_s,
        "inprocess_onnxruntime": r.ort,
        "batcher_overhead": r.overhead,
        "foldserve_rss_mib": r.matrix.rss,
        "measurements": [asdict(m) for m in r.matrix.measurements],
        "paired_rounds": r.paired,
        "rows64": r.rows64,
        "grpc": r.grpc,
        "overload": r.overload,
        "hostile": r.hostile,
        "real_networks": r.real,
        "targets": result,
        "profile": r.matrix.profile,
        "skipped": skipped,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "servers": {s.name: s.label for s in chosen},
    }
    (RESULTS / f"{stamp}.json").write_text(json.dumps(out, indent=1))
    if r.matrix.measurements:
        plot(r.matrix.measurements, RESULTS / f"{stamp}.png")
    if not any("FAILED" in x or "(" in x for x in skipped):
        shutil.rmtree(tmp, ignore_errors=True)  # keep the servers' logs when something failed
    png = " and .png" if r.matrix.measurements else ""
    print(f"\nwrote bench/results/{stamp}.json{png} in {out['wall_seconds']:.0f} s")
    return 0
