"""Per-version inference statistics in Triton's terms, counted where they happen.

The dataplane counts requests: success and fail (count and time from arrival to answer), the
time before the batcher (parse and validate: Triton's ``compute_input``) and after it (encode:
``compute_output``), and the rows answered (``inference_count``). The batcher counts its backend
runs (``execution_count``), each request's wait for its batch (``queue``) and the run that
computed it (``compute_infer``: a batch's time counts once per request in it, as in Triton).

Each stage is a histogram (``StageHistogram``): Triton's count and total come from its count and
sum, and ``/metrics`` exposes its buckets, so the two views are the same numbers.

NOTE: plain attribute increments and one bisect on the event loop: no lock (one loop per
process touches them), nothing allocated, well under a microsecond per stage (prometheus_client's
Histogram.observe takes a lock and costs about 1.3 us). With ``--workers`` each worker counts its
own requests, and ``mirror`` and ``pool`` add them to pooled metrics too (service.pooled_stats),
from which any worker answers for the whole server.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any, Protocol

_NS = 1e9
# Upper bounds in seconds, from tens of microseconds (one row of a small model) to the timeout.
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
STAGE_METRIC = "foldserve_stage_duration_seconds"  # their histograms in /metrics
Mirror = Callable[[float], None]  # a pooled histogram's observe, for --workers
# The other figures of a version's entry, by name: counts, seconds, and the last inference.
FIELDS = (
    "success_count",
    "success_s",
    "fail_count",
    "fail_s",
    "inference_count",
    "execution_count",
)


class Pool(Protocol):
    """Where a worker adds its figures with --workers, so that any worker can answer for all."""

    def add(self, field: str, value: float) -> None: ...

    def inferred(self, epoch_ms: int) -> None: ...


class StageHistogram:
    """Counts per bucket (the last one is +Inf), their sum in seconds; weights count a batch's
    time once per request in it."""

    __slots__ = ("buckets", "mirror", "sum")

    def __init__(self, mirror: Mirror | None = None) -> None:
        self.buckets = [0] * (len(STAGE_BUCKETS) + 1)
        self.sum = 0.0
        self.mirror = mirror

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def observe(self, seconds: float, weight: int = 1) -> None:
        self.buckets[bisect_left(STAGE_BUCKETS, seconds)] += weight
        self.sum += seconds * weight
        if self.mirror is not None:
            for _ in range(weight):
                self.mirror(seconds)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (upper bound, observations at or below it), ending with +Inf."""
        bounds = [*map(str, STAGE_BUCKETS), "+Inf"]
        running, rows = 0, []
        for bound, n in zip(bounds, self.buckets, strict=True):
            running += n
            rows.append((bound, running))
        return rows


class VersionStats:
    __slots__ = (
        "compute_infer",
        "compute_input",
        "compute_output",
        "execution_count",
        "fail_count",
        "fail_s",
        "inference_count",
        "last_inference_ms",
        "pool",
        "queue",
        "success",
    )

    def __init__(self, mirrors: dict[str, Mirror] | None = None) -> None:
        mirrors = mirrors or {}
        self.success = StageHistogram()  # arrival to answer, for each success
        self.fail_count = 0
        self.fail_s = 0.0
        self.queue = StageHistogram(mirrors.get("queue"))
        self.compute_input = StageHistogram(mirrors.get("compute_input"))  # with each success
        self.compute_infer = StageHistogram(mirrors.get("compute_infer"))
        self.compute_output = StageHistogram(mirrors.get("compute_output"))  # with each success
        self.inference_count = 0  # rows of successful requests
        self.execution_count = 0  # backend runs
        self.last_inference_ms = 0  # wall clock, milliseconds since the epoch
        self.pool: Pool | None = None  # with --workers: the figures pooled across workers

    def stage(self, name: str) -> StageHistogram:
        histogram: StageHistogram = getattr(self, name)
        return histogram

    # -- the dataplane

    def succeeded(self, rows: int, total_s: float, input_s: float, output_s: float) -> None:
        self.success.observe(total_s)
        self.compute_input.observe(input_s)
        self.compute_output.observe(output_s)
        self.inference_count += rows
        if self.pool is not None:
            self.pool.add("success_count", 1)
            self.pool.add("success_s", total_s)
            self.pool.add("inference_count", rows)

    def failed(self, total_s: float) -> None:
        self.fail_count += 1
        self.fail_s += total_s
        if self.pool is not None:
            self.pool.add("fail_count", 1)
            self.pool.add("fail_s", total_s)

    # -- the batcher

    def waited(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def ran(self, requests: int, seconds: float) -> None:
        """One backend run that computed (parts of) ``requests`` requests (a request split in
        two counts in both of its runs)."""
        self.execution_count += 1
        self.compute_infer.observe(seconds, requests)
        self.last_inference_ms = time.time_ns() // 1_000_000
        if self.pool is not None:
            self.pool.add("execution_count", 1)
            self.pool.inferred(self.last_inference_ms)

    def figures(self) -> dict[str, float]:
        """This process's figures, by the names ``triton_entry`` reads."""
        values: dict[str, float] = {
            "success_count": self.success.count,
            "success_s": self.success.sum,
            "fail_count": self.fail_count,
            "fail_s": self.fail_s,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "last_inference_ms": self.last_inference_ms,
        }
        for stage in STAGES:
            values[f"{stage}_count"] = self.stage(stage).count
            values[f"{stage}_s"] = self.stage(stage).sum
        return values


def triton_entry(name: str, version: int, figures: Mapping[str, float]) -> dict[str, Any]:
    """One version's ``model_stats`` entry, as Triton's statistics extension writes it, from
    ``figures`` (``VersionStats.figures``' names; one process's, or every worker's pooled)."""

    def get(field: str) -> float:
        return figures.get(field, 0.0)

    def duration(what: str) -> dict[str, int]:
        return {"count": round(get(f"{what}_count")), "ns": round(get(f"{what}_s") * _NS)}

    return {
        "name": name,
        "version": str(version),
        "last_inference": round(get("last_inference_ms")),
        "inference_count": round(get("inference_count")),
        "execution_count": round(get("execution_count")),
        "inference_stats": {
            "success": duration("success"),
            "fail": duration("fail"),
            **{stage: duration(stage) for stage in STAGES},
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
    }
