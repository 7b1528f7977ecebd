"""What a 64-row request costs the server, against what it may cost (issue 17's bounds).

A 64-row request should cost the web stack's share (the bare endpoint, reading the same body and
parsing nothing), the model (one 64-row onnxruntime call) and, for JSON, the parse of its body;
nothing else that grows with the rows. The bounds, in server CPU (all threads) per request:

    V2 binary:  bare's CPU per request + 2 x the in-process onnxruntime time of a 64-row batch
    JSON:       that + the in-process cost of orjson.loads + np.asarray on the very same body

The factor 2 leaves room for the copy into and out of the batch; a parse done twice, a thread
pool that spins, or the body parsed on the event loop and again in a worker does not fit.
foldserve and bare run side by side and are measured in turn, after the in-process references
of the same round (the machine's speed drifts within minutes); medians over rounds decide.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from load import checks, inprocess
from load.cases import Case, payload
from load.process import running
from load.servers import Server
from load.wrk import Measurement, measure

CASES = (Case("digits-mlp", 64, "v2bin"), Case("digits-mlp", 64))
SERVERS = ("foldserve", "bare")
CONNECTIONS = 8  # enough to keep one server process busy; CPU per request is then steady
REFERENCE_S = 0.5  # in-process timing per round, each of the model and the parse


def rounds(
    servers: list[Server], n: int, seconds: float, warmup: float, tmp: Path
) -> dict[str, Any]:
    per: dict[str, dict[str, list[Measurement]]] = {c.key: {} for c in CASES}
    ort_us: list[float] = []
    parse_us: list[float] = []
    json_body = payload(Case("digits-mlp", 64)).body
    with running(servers, tmp) as runs:
        for run in runs.values():
            checks.golden(run, "digits-mlp")  # post.lua then checks every answer's predictions
        for r in range(n):
            # NOTE: in this process, between the HTTP runs: the references see the machine's
            # speed of the same minute as the servers do.
            ref = inprocess.onnxruntime(["digits-mlp"], REFERENCE_S, batches=(64,))
            ort_us.append(ref["digits-mlp/batch64"]["median_call_us"])
            parse_us.append(inprocess.json_parse(json_body, REFERENCE_S)["median_us"])
            for case in CASES:
                names = list(runs)
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    m = measure(runs[name], case, CONNECTIONS, seconds, warmup, tmp, None)
                    per[case.key].setdefault(name, []).append(m)
    return summarize(per, ort_us, parse_us, len(json_body))


def summarize(
    per: dict[str, dict[str, list[Measurement]]],
    ort_us: list[float],
    parse_us: list[float],
    json_bytes: int,
) -> dict[str, Any]:
    ort, parse = statistics.median(ort_us), statistics.median(parse_us)
    cases: dict[str, Any] = {}
    for case in CASES:
        by = per[case.key]
        if not all(name in by for name in SERVERS):
            continue
        fs = [m.cpu_us_per_request for m in by["foldserve"]]
        bare = [m.cpu_us_per_request for m in by["bare"]]
        json = case.protocol == "predict"
        # Per round, so a drift of the machine's speed moves value and bound together.
        bounds = [
            b + 2 * o + (p if json else 0.0) for b, o, p in zip(bare, ort_us, parse_us, strict=True)
        ]
        cases[case.key] = {
            "protocol": case.protocol,
            "connections": CONNECTIONS,
            "foldserve_cpu_us_per_request": statistics.median(fs),
            "bare_cpu_us_per_request": statistics.median(bare),
            "ort_batch64_us": ort,
            "json_parse_us": parse if json else 0.0,
            "bound_us": statistics.median(bounds),
            "per_round": {"foldserve": fs, "bare": bare, "bound": bounds},
            "foldserve_requests_per_s": statistics.median(
                m.requests_per_s for m in by["foldserve"]
            ),
            "foldserve_cores": statistics.median(m.server_cpu_cores for m in by["foldserve"]),
            "errors": sum(m.errors for ms in by.values() for m in ms),
            "measurements": {name: [asdict(m) for m in ms] for name, ms in by.items()},
        }
    return {
        "rounds": len(ort_us),
        "ort_batch64_us_per_round": ort_us,
        "json_parse_us_per_round": parse_us,
        "json_body_bytes": json_bytes,
        "cases": cases,
    }


def planned_seconds(n: int, seconds: float, warmup: float) -> float:
    """Rounds x (references + cases x servers x (load + warm-up + drain + wrk's start))."""
    per_round = 2 * REFERENCE_S + 0.5 + len(CASES) * len(SERVERS) * (seconds + warmup + 0.7)
    return n * per_round + (10 if n else 0)
