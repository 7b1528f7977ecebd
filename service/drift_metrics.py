"""The drift gauges in ``/metrics``, read from the monitors at scrape time.

NOTE: with ``--workers`` the pooled ``/metrics`` is read from the workers' files, which a
scrape-time collector cannot join: each worker monitors its own share of the traffic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.drift import DriftMonitor


class DriftCollector(Collector):
    """``foldserve_input_drift_score`` and ``..._samples`` of every loaded version, and
    ``foldserve_hidden_drift_score`` and ``..._samples`` of every monitored hidden layer, read
    from the monitors at scrape time (as of their last fold, made in the fold thread at most
    ``FOLD_EVERY_S`` and one fold after a request).

    NOTE: with ``--workers`` /metrics pools the workers' files, which a collector cannot join:
    there the drift gauges are absent and ``GET /models/{name}/drift`` answers with the statistics
    of the worker that takes the request (its share of the traffic).
    """

    def __init__(self, source: Callable[[], Iterable[tuple[str, int, DriftMonitor]]]) -> None:
        self._source = source  # (model, version, monitor) of every version loaded

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels, layer_labels = ["model", "version"], ["model", "version", "layer"]
        score = GaugeMetricFamily(
            "foldserve_input_drift_score",
            "Drift of live inputs from the input BatchNorm's training statistics (docs/drift.md)",
            labels=labels,
        )
        samples = GaugeMetricFamily(
            "foldserve_input_drift_samples",
            "Samples in the drift window (decayed count)",
            labels=labels,
        )
        hidden_score = GaugeMetricFamily(
            "foldserve_hidden_drift_score",
            "Drift of a hidden BatchNorm's input (mapped from live inputs) from its training "
            "statistics (docs/drift.md)",
            labels=layer_labels,
        )
        hidden_samples = GaugeMetricFamily(
            "foldserve_hidden_drift_samples",
            "Samples in the hidden layer's drift window (decayed count; each layer samples rows "
            "within its own CPU budget)",
            labels=layer_labels,
        )
        for name, version, monitor in self._source():
            value, count = monitor.latest
            if monitor.available:
                score.add_metric([name, str(version)], math.nan if value is None else value)
                samples.add_metric([name, str(version)], count)
            for layer, layer_value, layer_count in monitor.latest_hidden:
                layer_score = math.nan if layer_value is None else layer_value
                hidden_score.add_metric([name, str(version), layer], layer_score)
                hidden_samples.add_metric([name, str(version), layer], layer_count)
        yield score
        yield samples
        yield hidden_score
        yield hidden_samples
