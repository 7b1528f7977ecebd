"""Metrics live on the registry they are given, so apps and tests never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.metrics import Metrics


def test_two_apps_keep_separate_metrics() -> None:
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.observe_request("m", "1", 200, 0.01)
    first.observe_request("m", "1", 200, 0.02)
    assert (
        first.registry.get_sample_value(
            "foldserve_requests_total", {"model": "m", "version": "1", "code": "200"}
        )
        == 2
    )
    assert (
        second.registry.get_sample_value(
            "foldserve_requests_total", {"model": "m", "version": "1", "code": "200"}
        )
        is None
    )


def test_the_batch_observer_records_rows_time_and_queue_depth() -> None:
    metrics = Metrics(CollectorRegistry())
    observer = metrics.observer("m", 3)
    observer.on_batch(5, 0.002)
    observer.on_batch(1, 0.001)
    observer.on_queue_depth(7)
    metrics.set_loaded("m", 3, True)
    labels = {"model": "m", "version": "3"}
    value = metrics.registry.get_sample_value
    assert value("foldserve_batch_size_sum", labels) == 6
    assert value("foldserve_batch_size_bucket", {**labels, "le": "1.0"}) == 1
    assert value("foldserve_inference_duration_seconds_count", labels) == 2
    assert value("foldserve_queue_depth", labels) == 7
    assert value("foldserve_model_loaded", labels) == 1
