"""``/metrics``: the Prometheus families, built at scrape time from ``service.telemetry``.

Nothing on the request path touches prometheus_client (whose every observation takes a lock):
the collector below reads the figures when Prometheus asks, the whole server's with --workers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.telemetry import CODES, LAYOUT, SHED_REASONS, STAGES, Reading, Telemetry

STAGE_METRIC = "foldserve_stage_duration_seconds"
_STAGE_HELP = (
    "Time per request in each stage, as Triton's statistics name them: queue (waiting for a "
    "batch), compute_input (reading and validating the request), compute_infer (the backend "
    "run that computed it), compute_output (encoding the answer)"
)


class TelemetryCollector(Collector):
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        readings = self._telemetry.read()
        yield _requests(readings)
        yield _grpc_requests(readings)
        yield _durations(readings)
        yield from _batches(readings)
        yield _stages(readings)
        yield _shed(readings)
        yield from _gauges(readings)
        yield from _processes(*self._telemetry.processes())


def _versions(readings: dict[tuple[str, str], Reading]) -> Iterator[tuple[str, str, Reading]]:
    for (model, version), reading in sorted(readings.items()):
        yield model, version, reading


def _requests(readings: dict[tuple[str, str], Reading]) -> Metric:
    help_text = "Inference requests by model, version and HTTP status code"
    return _by_code("foldserve_requests", help_text, readings, LAYOUT.codes, LAYOUT.other_code)


def _grpc_requests(readings: dict[tuple[str, str], Reading]) -> Metric:
    help_text = (
        "Inference requests over gRPC (ModelInfer, ModelStreamInfer), a part of "
        "foldserve_requests_total, by model, version and the HTTP status code of the same error "
        "(service/rpc/status.py maps it to the gRPC status)"
    )
    slots, other = LAYOUT.grpc_codes, LAYOUT.grpc_other
    return _by_code("foldserve_grpc_requests", help_text, readings, slots, other)


def _by_code(
    name: str,
    help_text: str,
    readings: dict[tuple[str, str], Reading],
    slots: dict[int, int],
    other_slot: int,
) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=["model", "version", "code"])
    for model, version, reading in _versions(readings):
        for code in CODES:
            count = reading.get(slots[code])
            if count:
                family.add_metric([model, version, str(code)], count)
        other = reading.get(other_slot)
        if other:
            family.add_metric([model, version, "other"], other)
    return family


def _durations(readings: dict[tuple[str, str], Reading]) -> Metric:
    family = HistogramMetricFamily(
        "foldserve_request_duration_seconds",
        "Time from reading a request to having its answer",
        labels=["model"],
    )
    by_model: dict[str, list[float]] = defaultdict(lambda: [0.0] * LAYOUT.size)
    for model, _, reading in _versions(readings):
        summed = by_model[model]
        for i in range(LAYOUT.duration.start, LAYOUT.duration.end):
            summed[i] += reading.get(i)
    for model, slots in sorted(by_model.items()):
        buckets, total = Reading(slots, 1).histogram(LAYOUT.duration)
        family.add_metric([model], buckets, total)
    return family


def _batches(readings: dict[tuple[str, str], Reading]) -> Iterator[Metric]:
    sizes = HistogramMetricFamily(
        "foldserve_batch_size", "Rows per backend call", labels=["model", "version"]
    )
    times = HistogramMetricFamily(
        "foldserve_inference_duration_seconds",
        "Time of one backend call (one batch)",
        labels=["model", "version"],
    )
    for model, version, reading in _versions(readings):
        if model:
            sizes.add_metric([model, version], *reading.histogram(LAYOUT.batch_rows))
            times.add_metric([model, version], *reading.histogram(LAYOUT.batch_seconds))
    yield sizes
    yield times


def _stages(readings: dict[tuple[str, str], Reading]) -> Metric:
    family = HistogramMetricFamily(STAGE_METRIC, _STAGE_HELP, labels=["model", "version", "stage"])
    for model, version, reading in _versions(readings):
        if model:
            for stage in STAGES:
                family.add_metric([model, version, stage], *reading.histogram(LAYOUT.stages[stage]))
    return family


def _shed(readings: dict[tuple[str, str], Reading]) -> Metric:
    family = CounterMetricFamily(
        "foldserve_requests_shed",
        "Requests refused to protect the others: queue_full (no room for the rows), deadline "
        "(the estimated wait exceeds the request's time budget), connections (past "
        "max_connections), body_memory (past max_body_memory_bytes)",
        labels=["model", "version", "reason"],
    )
    for model, version, reading in _versions(readings):
        for reason in SHED_REASONS:
            count = reading.get(LAYOUT.shed[reason])
            if count:
                family.add_metric([model, version, reason], count)
    return family


def _gauges(readings: dict[tuple[str, str], Reading]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "foldserve_queue_depth", "Rows waiting for a batch", labels=["model", "version"]
    )
    wait = GaugeMetricFamily(
        "foldserve_estimated_wait_seconds",
        "Estimated wait of a one-row request arriving now (queue ahead x batch time)",
        labels=["model", "version"],
    )
    loaded = GaugeMetricFamily(
        "foldserve_model_loaded",
        "1 when the version is verified and serving (in every live worker), else 0",
        labels=["model", "version"],
    )
    memory = GaugeMetricFamily(
        "foldserve_model_memory_bytes",
        "Resident memory a loaded version added when it loaded (its sessions' weights and "
        "arenas; summed over workers, each holds its own)",
        labels=["model", "version"],
    )
    for model, version, reading in _versions(readings):
        if not model:
            continue
        labels = [model, version]
        depth.add_metric(labels, reading.get(LAYOUT.gauges["queue_depth"]))
        wait.add_metric(labels, reading.get(LAYOUT.gauges["estimated_wait_s"]))
        loaded.add_metric(labels, reading.get(LAYOUT.gauges["loaded"]))
        memory.add_metric(labels, reading.get(LAYOUT.gauges["memory_bytes"]))
    yield depth
    yield wait
    yield loaded
    yield memory


def _processes(started: int, alive: int) -> Iterator[Metric]:
    starts = CounterMetricFamily(
        "foldserve_worker_starts",
        "Worker processes started since the server started (1 without --workers; more than "
        "--workers means the supervisor restarted a worker that died)",
    )
    starts.add_metric([], started)
    yield starts
    live = GaugeMetricFamily("foldserve_workers_alive", "Worker processes serving now")
    live.add_metric([], alive)
    yield live
