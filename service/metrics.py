"""Prometheus metrics on a registry passed in (never the global one): apps can live side by side.

With ``--workers`` every process writes its values to files in one folder (prometheus_client's
multiprocess mode, switched on by the supervisor) and ``/metrics`` reads them all, so a scrape
sees the whole server whichever worker answers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.pooled_stats import Figures, PooledStats
from service.stats import STAGE_BUCKETS, STAGE_METRIC, STAGES, VersionStats

StageSource = Callable[[], Iterable[tuple[str, int, VersionStats]]]
_STAGE_HELP = (
    "Time per request in each stage, as Triton's statistics name them: queue (waiting for a "
    "batch), compute_input (reading and validating the request), compute_infer (the backend "
    "run that computed it), compute_output (encoding the answer)"
)

# Latencies here range from tens of microseconds (one small batch) to the request timeout.
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, registry: CollectorRegistry, pooled_dir: Path | None = None) -> None:
        self.registry = registry
        self._pooled_dir = pooled_dir
        self.requests = Counter(
            "foldserve_requests",
            "Inference requests by model, version and HTTP status code",
            ["model", "version", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "foldserve_request_duration_seconds",
            "Time from reading a request to having its answer",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "foldserve_batch_size",
            "Rows per backend call",
            ["model", "version"],
            buckets=_ROWS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "foldserve_queue_depth",
            "Rows waiting for a batch",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livesum",  # rows waiting in all live workers
        )
        self.inference_duration = Histogram(
            "foldserve_inference_duration_seconds",
            "Time of one backend call (one batch)",
            ["model", "version"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.model_loaded = Gauge(
            "foldserve_model_loaded",
            "1 when the version is verified and serving (in every live worker), else 0",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.shed = Counter(
            "foldserve_requests_shed",
            "Requests refused to protect the others: queue_full (no room for the rows) or "
            "deadline (the estimated wait exceeds the request's time budget)",
            ["model", "version", "reason"],
            registry=registry,
        )
        self.estimated_wait = Gauge(
            "foldserve_estimated_wait_seconds",
            "Estimated wait of a one-row request arriving now (queue ahead x batch time)",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        # With --workers, stages go to pooled histograms too; alone, a collector reads the
        # versions' own counts at scrape time (no lock, no prometheus_client on the hot path).
        self._stage_histogram = (
            Histogram(
                STAGE_METRIC,
                _STAGE_HELP,
                ["model", "version", "stage"],
                buckets=STAGE_BUCKETS,
                registry=registry,
            )
            if pooled_dir is not None
            else None
        )
        self._pooled_stats = None if pooled_dir is None else PooledStats(registry, pooled_dir)
        # NOTE: labels() takes a lock and builds a tuple on every call; the hot path reuses
        # the children. Keys are bounded: only resolved models and real status codes get here.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._wait_children: dict[tuple[str, int], Gauge] = {}

    def exposition(self) -> bytes:
        """The text format of this process's metrics, or of every worker's when pooled."""
        if self._pooled_dir is None:
            return generate_latest(self.registry)
        pooled = CollectorRegistry()
        MultiProcessCollector(pooled, path=str(self._pooled_dir))  # type: ignore[no-untyped-call]
        return generate_latest(pooled)

    def observe_request(self, model: str, version: str, code: int, seconds: float) -> None:
        """Count one finished request; model and version are "" when it never resolved to one."""
        key = (model, version, code)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(model, version, str(code)),
                self.request_duration.labels(model),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_shed(self, model: str, version: str, reason: str) -> None:
        self.shed.labels(model, version, reason).inc()

    def observe_wait(self, model: str, version: int, seconds: float) -> None:
        child = self._wait_children.get((model, version))
        if child is None:
            child = self._wait_children[(model, version)] = self.estimated_wait.labels(
                model, str(version)
            )
        child.set(seconds)

    def watch_stages(self, source: StageSource) -> None:
        """Expose the stage histograms of the versions ``source`` lists (read at each scrape)."""
        if self._stage_histogram is None:
            self.registry.register(_StageCollector(source))

    def mirror_stages(self, model: str, version: int, stats: VersionStats) -> None:
        """With --workers, make ``stats`` feed the pooled stage histograms and Triton's other
        figures as well."""
        if self._stage_histogram is None or self._pooled_stats is None:
            return
        for stage in STAGES:
            child = self._stage_histogram.labels(model, str(version), stage)
            stats.stage(stage).mirror = child.observe
        stats.pool = self._pooled_stats.pool(model, version)

    def pooled_figures(self) -> dict[tuple[str, str], Figures] | None:
        """With --workers, every worker's Triton figures by (model, version); else None."""
        return None if self._pooled_stats is None else self._pooled_stats.read()

    def set_loaded(self, model: str, version: int, loaded: bool) -> None:
        self.model_loaded.labels(model, str(version)).set(1 if loaded else 0)

    def observer(self, model: str, version: int) -> VersionObserver:
        return VersionObserver(self, model, str(version))


class VersionObserver:
    """The batcher's observer for one model version (see service.batching.BatchObserver)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._batch_size = metrics.batch_size.labels(model, version)
        self._inference = metrics.inference_duration.labels(model, version)
        self._queue_depth = metrics.queue_depth.labels(model, version)

    def on_batch(self, rows: int, seconds: float) -> None:
        self._batch_size.observe(rows)
        self._inference.observe(seconds)

    def on_queue_depth(self, rows: int) -> None:
        self._queue_depth.set(rows)


class _StageCollector(Collector):
    def __init__(self, source: StageSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            STAGE_METRIC, _STAGE_HELP, labels=["model", "version", "stage"]
        )
        for model, version, stats in self._source():
            for stage in STAGES:
                histogram = stats.stage(stage)
                family.add_metric(
                    [model, str(version), stage], histogram.cumulative(), histogram.sum
                )
        yield family
