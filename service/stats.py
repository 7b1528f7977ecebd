"""Per-version inference statistics in Triton's terms, counted where they happen.

The dataplane counts requests: success and fail (count and time from arrival to answer), the
time before the batcher (parse and validate: Triton's ``compute_input``) and after it (encode:
``compute_output``), and the rows answered (``inference_count``). The batcher counts its backend
runs (``execution_count``), each request's wait for its batch (``queue``) and the run that
computed it (``compute_infer``: a batch's time counts once per request in it, as in Triton).

NOTE: plain attribute increments on the event loop: no lock (one loop per process touches
them), nothing allocated, about a third of a microsecond per request. With ``--workers`` each
worker counts its own requests; ``/metrics`` is the pooled view.
"""

from __future__ import annotations

import time
from typing import Any

_NS = 1e9


class VersionStats:
    __slots__ = (
        "execution_count",
        "fail_count",
        "fail_s",
        "infer_count",
        "infer_s",
        "inference_count",
        "input_s",
        "last_inference_ms",
        "output_s",
        "queue_count",
        "queue_s",
        "success_count",
        "success_s",
    )

    def __init__(self) -> None:
        self.success_count = 0
        self.success_s = 0.0
        self.fail_count = 0
        self.fail_s = 0.0
        self.input_s = 0.0  # counted with each success
        self.output_s = 0.0  # counted with each success
        self.inference_count = 0  # rows of successful requests
        self.execution_count = 0  # backend runs
        self.infer_count = 0  # requests those runs computed (a request split in two counts 2)
        self.infer_s = 0.0
        self.queue_count = 0
        self.queue_s = 0.0
        self.last_inference_ms = 0  # wall clock, milliseconds since the epoch

    # -- the dataplane

    def succeeded(self, rows: int, total_s: float, input_s: float, output_s: float) -> None:
        self.success_count += 1
        self.success_s += total_s
        self.input_s += input_s
        self.output_s += output_s
        self.inference_count += rows

    def failed(self, total_s: float) -> None:
        self.fail_count += 1
        self.fail_s += total_s

    # -- the batcher

    def waited(self, seconds: float) -> None:
        self.queue_count += 1
        self.queue_s += seconds

    def ran(self, requests: int, seconds: float) -> None:
        self.execution_count += 1
        self.infer_count += requests
        self.infer_s += seconds * requests
        self.last_inference_ms = time.time_ns() // 1_000_000

    def triton(self, name: str, version: int) -> dict[str, Any]:
        """This version's ``model_stats`` entry, as Triton's statistics extension writes it."""
        return {
            "name": name,
            "version": str(version),
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration(self.success_count, self.success_s),
                "fail": _duration(self.fail_count, self.fail_s),
                "queue": _duration(self.queue_count, self.queue_s),
                "compute_input": _duration(self.success_count, self.input_s),
                "compute_infer": _duration(self.infer_count, self.infer_s),
                "compute_output": _duration(self.success_count, self.output_s),
                "cache_hit": _duration(0, 0.0),
                "cache_miss": _duration(0, 0.0),
            },
            "batch_stats": [],
        }


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * _NS)}
