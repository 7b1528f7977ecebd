"""Figures live in the telemetry they are given, so apps and tests never share counters, and
/metrics reads them at scrape time in Prometheus's names."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from service.metrics import TelemetryCollector
from service.telemetry import Telemetry


def registry_of(telemetry: Telemetry) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(telemetry))
    return registry


def test_two_apps_keep_separate_figures() -> None:
    first, second = Telemetry(), Telemetry()
    figures = first.version("m", 1)
    figures.answered(rows=2, total_s=0.01, input_s=0.001, output_s=0.001)
    figures.answered(rows=1, total_s=0.02, input_s=0.001, output_s=0.001)
    labels = {"model": "m", "version": "1", "code": "200"}
    assert registry_of(first).get_sample_value("foldserve_requests_total", labels) == 2
    assert registry_of(second).get_sample_value("foldserve_requests_total", labels) is None


def test_batches_queue_depth_refusals_and_loaded_are_read_at_scrape_time() -> None:
    telemetry = Telemetry()
    figures = telemetry.version("m", 3)
    figures.ran(requests=2, rows=5, seconds=0.002)
    figures.ran(requests=1, rows=1, seconds=0.001)
    figures.gauge(queue_rows=7, estimated_wait_s=0.25)
    figures.loaded(True)
    figures.refused(503, 0.001, shed="deadline")
    telemetry.unresolved.refused(404, 0.0005)
    value = registry_of(telemetry).get_sample_value
    labels = {"model": "m", "version": "3"}
    assert value("foldserve_batch_size_sum", labels) == 6
    assert value("foldserve_batch_size_bucket", {**labels, "le": "1.0"}) == 1
    assert value("foldserve_inference_duration_seconds_count", labels) == 2
    assert value("foldserve_queue_depth", labels) == 7
    assert value("foldserve_estimated_wait_seconds", labels) == 0.25
    assert value("foldserve_model_loaded", labels) == 1
    assert value("foldserve_requests_shed_total", {**labels, "reason": "deadline"}) == 1
    assert value("foldserve_requests_total", {**labels, "code": "503"}) == 1
    unresolved = {"model": "", "version": "", "code": "404"}
    assert value("foldserve_requests_total", unresolved) == 1
    assert value("foldserve_request_duration_seconds_count", {"model": "m"}) == 1


def test_many_versions_grow_the_store_without_losing_figures() -> None:
    telemetry = Telemetry()
    first = telemetry.version("a", 1)
    first.answered(rows=1, total_s=0.001, input_s=0.0, output_s=0.0)
    for version in range(2, 60):  # past the first allocation
        telemetry.version("a", version).loaded(True)
    first.answered(rows=1, total_s=0.001, input_s=0.0, output_s=0.0)
    readings = telemetry.read()
    assert readings[("a", "1")].get(0) == 2  # both answers, across the move
    assert all(readings[("a", str(v))].live_workers == 1 for v in range(2, 60))


def test_worker_processes_count_every_worker_file_and_only_live_ones_as_serving(
    tmp_path: Path,
) -> None:
    # Worker files are named worker-<pid>-<start ns>; a restarted worker writes a new one and
    # the dead one's file stays (its counts stay in the totals).
    assert Telemetry().processes() == (1, 1)
    me = Telemetry(tmp_path)
    me.share()
    (tmp_path / "worker-999999999-1.json").write_text('{"keys": []}')  # no such process
    started, alive = me.processes()
    assert (started, alive) == (2, 1)
    registry = registry_of(me)
    assert registry.get_sample_value("foldserve_worker_starts_total") == 2
    assert registry.get_sample_value("foldserve_workers_alive") == 1
