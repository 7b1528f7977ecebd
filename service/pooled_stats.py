"""Triton's statistics across ``--workers``: every worker adds its figures to pooled metrics, and
whichever worker answers ``/v2/models/.../stats`` reads them all.

Without this each worker would answer with its own share of the traffic (half, with two), and
tritonclient or perf_analyzer would see figures that jump between calls. The stage times come
from the pooled stage histograms (``foldserve_stage_duration_seconds``); the counts and times of
successes and failures, the rows answered and the backend runs from one counter per figure; the
last inference from a gauge whose pooled value is the latest of any worker.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector

from service.stats import FIELDS, STAGE_METRIC, STAGES

_FIELDS_METRIC = "foldserve_version_stats"
_LAST_METRIC = "foldserve_last_inference_ms"
Figures = dict[str, float]  # service.stats.VersionStats.figures' names


class PooledFields:
    """One version's figures in this worker, added to the pooled metrics (a ``stats.Pool``)."""

    def __init__(self, fields: Counter, last: Gauge, model: str, version: str) -> None:
        self._children = {field: fields.labels(model, version, field) for field in FIELDS}
        self._last = last.labels(model, version)

    def add(self, field: str, value: float) -> None:
        self._children[field].inc(value)

    def inferred(self, epoch_ms: int) -> None:
        self._last.set(epoch_ms)


class PooledStats:
    def __init__(self, registry: CollectorRegistry, pooled_dir: Path) -> None:
        self._pooled_dir = pooled_dir
        self._fields = Counter(
            _FIELDS_METRIC,
            "Triton's statistics figures of a version, pooled across workers (with --workers "
            "only): success_count, success_s, fail_count, fail_s, inference_count (rows), "
            "execution_count (backend runs)",
            ["model", "version", "field"],
            registry=registry,
        )
        self._last = Gauge(
            _LAST_METRIC,
            "Wall-clock time of the version's last backend run, ms since the epoch (--workers)",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="max",
        )

    def pool(self, model: str, version: int) -> PooledFields:
        return PooledFields(self._fields, self._last, model, str(version))

    def read(self) -> dict[tuple[str, str], Figures]:
        """Every worker's figures summed, by (model, version)."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._pooled_dir))  # type: ignore[no-untyped-call]
        figures: dict[tuple[str, str], Figures] = defaultdict(dict)
        for family in registry.collect():
            for sample in family.samples:
                key = (sample.labels.get("model", ""), sample.labels.get("version", ""))
                if family.name == _FIELDS_METRIC and sample.name.endswith("_total"):
                    figures[key][sample.labels["field"]] = sample.value
                elif family.name == _LAST_METRIC:
                    figures[key]["last_inference_ms"] = sample.value
                elif family.name == STAGE_METRIC and sample.labels.get("stage") in STAGES:
                    stage = sample.labels["stage"]
                    if sample.name.endswith("_count"):
                        figures[key][f"{stage}_count"] = sample.value
                    elif sample.name.endswith("_sum"):
                        figures[key][f"{stage}_s"] = sample.value
        return figures
