"""Triton's statistics extension, read from the same figures as ``/metrics`` (service.telemetry).

Counted where they happen: the dataplane counts requests (success and fail: count and time from
arrival to answer), the time before the batcher (parse and validate: Triton's ``compute_input``)
and after it (encode: ``compute_output``), and the rows answered (``inference_count``). The
batcher counts its backend runs (``execution_count``), each request's wait for its batch
(``queue``) and the run that computed it (``compute_infer``: a batch's time counts once per
request in it, as in Triton). Each stage is a histogram: Triton's count and total are its count
and sum, so the two views are the same numbers.
"""

from __future__ import annotations

from typing import Any

from service.errors import ModelNotFound
from service.registry import Registry
from service.telemetry import LAYOUT, STAGES, Reading, Telemetry
from service.versions import Status

_NS = 1e9


def triton_entry(name: str, version: int, reading: Reading | None) -> dict[str, Any]:
    """One version's ``model_stats`` entry, as Triton's statistics extension writes it."""

    def get(field: str) -> float:
        return 0.0 if reading is None else reading.get(LAYOUT.counts[field])

    def duration(count: float, seconds: float) -> dict[str, int]:
        return {"count": round(count), "ns": round(seconds * _NS)}

    stages = {}
    for stage in STAGES:
        histogram = LAYOUT.stages[stage]
        count = 0.0 if reading is None else reading.count(histogram)
        total = 0.0 if reading is None else reading.get(histogram.sum_slot)
        stages[stage] = duration(count, total)
    return {
        "name": name,
        "version": str(version),
        "last_inference": round(get("last_inference_ms")),
        "inference_count": round(get("inference_count")),
        "execution_count": round(get("execution_count")),
        "inference_stats": {
            "success": duration(get("success_count"), get("success_s")),
            "fail": duration(get("fail_count"), get("fail_s")),
            **stages,
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
    }


# Versions that serve (or served, at shutdown); one loading or failed has nothing to count.
COUNTED = (Status.READY, Status.STOPPED)


def model_stats(
    registry: Registry, telemetry: Telemetry, name: str | None, version: int | None
) -> dict[str, Any]:
    """Triton's statistics document: every counted version, or those of ``name`` (and
    ``version``); with --workers, every worker's figures (pooled)."""
    entries = registry.entries()
    if name is not None:
        entries = [e for e in entries if e.name == name]
        if not entries:
            raise ModelNotFound(f"model {name!r} not found")
        if version is not None:
            entries = [e for e in entries if e.version == version]
            if not entries:
                raise ModelNotFound(f"model {name!r} has no version {version}")
    readings = telemetry.read()
    return {
        "model_stats": [
            triton_entry(e.name, e.version, readings.get((e.name, str(e.version))))
            for e in entries
            if e.status in COUNTED
        ]
    }
