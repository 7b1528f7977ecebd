"""Everything a run prints at its end: each part's tables, then the targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from load import report, report_cost
from load.matrix import Matrix


@dataclass
class Results:
    """What each part of a run measured; None where a part was left out or failed."""

    matrix: Matrix
    ort: dict[str, dict[str, float]] = field(default_factory=dict)
    overhead: dict[str, Any] | None = None
    paired: dict[str, Any] | None = None
    rows64: dict[str, Any] | None = None
    grpc: dict[str, Any] | None = None
    overload: dict[str, dict[str, Any]] | None = None
    hostile: dict[str, Any] | None = None
    real: dict[str, Any] | None = None


def print_report(r: Results, targets: list[dict[str, Any]]) -> None:
    if r.matrix.measurements:
        print("\n## Results (main matrix)\n")
        print(report.results_table(r.matrix.measurements, r.ort))
    if r.overhead:
        print("\n## In-process onnxruntime (1 thread, foldserve's session options)\n")
        print(report.references(r.ort, r.overhead, r.matrix.rss))
    if r.paired:
        print(
            "\n## foldserve vs the bare endpoint and raw ASGI (mlpx1, medians of paired rounds)\n"
        )
        print(report.low_concurrency(r.paired))
        print("\n## What a request costs: server CPU of all threads (mlpx1, medians of rounds)\n")
        print(report_cost.cost_table(r.paired))
        print("\n## Paired rounds (mlpx1; servers side by side, measured in turn)\n")
        print(report.rounds_table(r.paired))
        print(f"\nerrors in the paired rounds: {r.paired['errors']}")
    if r.rows64:
        print("\n## 64-row requests: server CPU per request against its bound\n")
        print(report_cost.rows64_table(r.rows64))
    if r.overload:
        print("\n## Overload (closed loop, client gives up after 1 s; goodput = 200s in time)\n")
        print(report.overload_table(r.overload))
    if r.hostile:
        print("\n## One hostile client (~60 MB bodies) beside 8 ordinary ones\n")
        print(report_cost.hostile_table(r.hostile))
    if r.real:
        print("\n## Real networks (MONAI, random weights): served vs onnxruntime in-process\n")
        print(report_cost.real_table(r.real))
    print("\n## Targets\n")
    print(report.targets_table(targets))
    if r.matrix.profile:
        print("\n## Profile of foldserve under load (event loop thread, % of its samples)\n")
        print(report.profile_text(r.matrix.profile))
