"""Input drift: live inputs against the frozen statistics of the model's input BatchNorm.

The manifest keeps that BatchNorm's training mean and variance per feature (per channel for
images, spatial positions pooled), recorded before folding (``service.store.InputStatistics``).
With ``mean_i``, ``var_i`` the reference of feature (or channel) i, ``floor = max(eps, 0.01 *
the average of var_i over features)``, and the live mean and variance taken over the window:

    mean_shift_i    = (live mean_i - mean_i) / sqrt(var_i + floor)
    log_var_ratio_i = ln((live var_i + floor) / (var_i + floor))
    score           = mean_i |mean_shift_i| + mean_i |log_var_ratio_i|

0 means the live inputs have the training means and variances; 0.5 is, e.g., every feature's
mean moved by half a training standard deviation, or every variance scaled by e^0.5 = 1.65.
A version is ``drifted`` when ``score > threshold`` (``drift_threshold``, default 0.5) with at
least ``MIN_SAMPLES`` samples in the window.

NOTE: the floor, not the BN's eps (1e-5), keeps features that were (almost) constant in training
from ruling the mean through sampling noise: digits' border pixels have variance 0, and one
stray 1 there would read as 300 standard deviations. A feature whose variance is below 1% of the
average is thus measured against the floor; the per-feature detail still shows it. Measured on
the shipped digits-mlp (docs/drift.md): the held-out digits score 0.11, any 100 of them at most
0.3; pixels x1.2 score 0.53, x1.5 + 1 1.8, inverted 9.

Window: every sample's weight decays by ``1 - 1 / window`` per later sample (exactly, also
within one fold), so ``samples`` (the sum of weights) tends to ``window`` and data ``window``
samples old weighs e^-1. Memory is a few vectors per version, whatever the traffic.

Cost on the request path: ``observe`` appends the request's validated array to a pending list;
the arithmetic runs later on the event loop, for everything pending at once, at most every
``FOLD_EVERY_S`` (or inline when pending data passes ``MAX_PENDING_BYTES``), on the newest
``MAX_FOLD_ROWS`` rows at most (heavy traffic is sampled). The statistics are only observed:
nothing here touches the model or the request's answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.backends import Array
from service.store import InputStatistics, Manifest

log = logging.getLogger(__name__)
Float64 = npt.NDArray[np.float64]
DEFAULT_THRESHOLD = 0.5
DEFAULT_WINDOW = 2000  # samples; about one digits test set and a half
MIN_SAMPLES = 100  # below this, sampling noise alone can push the score near the threshold
FLOOR_FRACTION = 0.01  # of the average reference variance, added to every variance
FOLD_EVERY_S = 0.05
MAX_PENDING_BYTES = 4 << 20
# NOTE: the newest rows only, at most this many per fold: a 1,024-row request costs its fold
# about 1 ms (against 2.5 ms of inference), so heavy traffic is sampled, at most 512 rows every
# 50 ms; a window of 2,000 samples then spans at least 0.2 s of traffic.
MAX_FOLD_ROWS = 512
NO_INPUT_BN = (
    "the manifest records no input BatchNorm statistics: the model has no BatchNorm on its "
    "input (or was exported before foldserve kept them), so there is no reference to compare with"
)


@dataclass(frozen=True)
class FeatureDrift:
    index: int
    name: str | None  # manifests name no features yet
    live_mean: float | None  # None before any sample
    ref_mean: float
    mean_shift: float | None  # (live mean - ref mean) / sqrt(ref var + floor)
    live_var: float | None
    ref_var: float
    log_var_ratio: float | None  # ln((live var + floor) / (ref var + floor))


@dataclass(frozen=True)
class DriftReport:
    available: bool
    reason: str | None
    layer: str | None
    axis: str | None
    source: str | None
    score: float | None  # None before any sample, or without a reference
    threshold: float
    drifted: bool
    samples: float  # the decayed count of samples in the window
    window: int
    features: list[FeatureDrift]


class DriftMonitor:
    """Streaming moments of one model version's inputs; see the module docstring.

    NOTE: call every method on the event loop's thread (or, without a loop, one thread): the
    pending list is swapped without a lock. ``latest`` is one tuple assignment, safe to read from
    any thread (the Prometheus collector).
    """

    def __init__(
        self,
        reference: InputStatistics | None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        window: int = DEFAULT_WINDOW,
        max_fold_rows: int | None = MAX_FOLD_ROWS,
    ) -> None:
        self.reference, self.threshold, self.window = reference, threshold, window
        self._max_fold_rows = max_fold_rows  # None: every row counts (exact, for tests)
        self._decay = 1.0 - 1.0 / window
        self._pending: list[Array] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._weight = 0.0  # decayed sample count
        self.latest: tuple[float | None, float] = (None, 0.0)  # (score, samples) at the last fold
        if reference is None:
            return
        self._mean = np.asarray(reference.mean, dtype=np.float64)
        self._var = np.asarray(reference.var, dtype=np.float64)
        self._floor = max(reference.eps, FLOOR_FRACTION * float(self._var.mean()), 1e-12)
        self._scale = np.sqrt(self._var + self._floor)
        self._inv_scale = (1.0 / self._scale).astype(np.float32)
        self._mean32 = self._mean.astype(np.float32)
        self._sum = np.zeros_like(self._mean)  # decayed sums of z and z^2 per feature/channel
        self._sum_sq = np.zeros_like(self._mean)

    @classmethod
    def for_manifest(cls, manifest: Manifest, threshold: float = DEFAULT_THRESHOLD) -> DriftMonitor:
        return cls(manifest.input_statistics, threshold=threshold)

    @property
    def available(self) -> bool:
        return self.reference is not None

    def observe(self, rows: Array) -> None:
        """Note one request's validated rows (n, *sample shape); never raises, O(1) here."""
        if self.reference is None:
            return
        self._pending.append(rows)
        self._pending_bytes += rows.nbytes
        if self._pending_bytes > MAX_PENDING_BYTES:
            self._fold_safely()  # bounded memory under any load; amortized over MB of inputs
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a script, a test): folded at the next report
            self._scheduled = True
            loop.call_later(FOLD_EVERY_S, self._fold_safely)

    def report(self) -> DriftReport:
        self._fold_safely()
        ref = self.reference
        if ref is None:
            return DriftReport(
                False, NO_INPUT_BN, None, None, None, None, self.threshold, False, 0.0,
                self.window, [],
            )  # fmt: skip
        score, samples = self.latest
        shift, var_z = self._moments()
        log_ratio, live = self._log_ratio(var_z), samples > 0
        features = []
        for i in range(len(self._mean)):
            live_var = float(var_z[i] * self._scale[i] ** 2) if live else None
            features.append(
                FeatureDrift(
                    index=i,
                    name=None,
                    live_mean=float(self._mean[i] + shift[i] * self._scale[i]) if live else None,
                    ref_mean=float(self._mean[i]),
                    mean_shift=float(shift[i]) if live else None,
                    live_var=live_var,
                    ref_var=float(self._var[i]),
                    log_var_ratio=float(log_ratio[i]) if live else None,
                )
            )
        return DriftReport(
            available=True,
            reason=None,
            layer=ref.layer,
            axis=ref.axis,
            source=ref.source,
            score=score,
            threshold=self.threshold,
            drifted=self.drifted(),
            samples=samples,
            window=self.window,
            features=features,
        )

    def drifted(self) -> bool:
        score, samples = self.latest
        return score is not None and samples >= MIN_SAMPLES and score > self.threshold

    def fold_pending(self) -> None:
        """Add every pending row to the decayed sums, in one vectorized pass."""
        self._scheduled = False
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending or self.reference is None:
            return
        rows = np.concatenate(self._newest(pending))  # validated: each (n_i, *sample shape)
        n, features = len(rows), len(self._mean)
        # Row j of n weighs decay^(n - 1 - j): the newest 1, as if folded one row at a time.
        weights = self._decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
        if self.reference.axis == "feature":
            z = (rows.reshape(n, features) - self._mean32) * self._inv_scale
            per_row, per_row_sq = z, z * z
        else:  # (n, C, *spatial): every position of a channel is one more sample of it
            z = (rows.reshape(n, features, -1) - self._mean32[:, None]) * self._inv_scale[:, None]
            per_row, per_row_sq = z.mean(2, dtype=np.float64), (z * z).mean(2, dtype=np.float64)
        keep = self._decay**n
        self._weight = self._weight * keep + float(weights.sum())
        self._sum = self._sum * keep + weights @ per_row
        self._sum_sq = self._sum_sq * keep + weights @ per_row_sq
        self.latest = (self._score(), self._weight)

    def _newest(self, pending: list[Array]) -> list[Array]:
        cap = self._max_fold_rows
        if cap is None:
            return pending
        newest: list[Array] = []
        taken = 0
        for array in reversed(pending):
            newest.append(array[max(0, len(array) - (cap - taken)) :])
            taken += len(newest[-1])
            if taken >= cap:
                break
        return newest[::-1]

    def _fold_safely(self) -> None:
        try:
            self.fold_pending()
        except Exception:  # a monitoring bug must never fail a request or the loop
            log.exception("drift monitoring failed; its statistics are reset")
            self._pending, self._pending_bytes, self._scheduled = [], 0, False
            self._weight, self.latest = 0.0, (None, 0.0)
            self._sum, self._sum_sq = np.zeros_like(self._mean), np.zeros_like(self._mean)

    def _moments(self) -> tuple[Float64, Float64]:
        """Live mean and variance of z per feature (zeros before any sample)."""
        if self._weight <= 0:
            return np.zeros_like(self._mean), np.zeros_like(self._mean)
        shift = self._sum / self._weight
        return shift, np.maximum(self._sum_sq / self._weight - shift**2, 0.0)

    def _log_ratio(self, var_z: Float64) -> Float64:
        # (live var + floor) / (ref var + floor) = var_z + floor / (ref var + floor), with z
        # standardized by sqrt(ref var + floor): finite even for a feature constant throughout.
        result: Float64 = np.log(var_z + self._floor / self._scale**2)
        return result

    def _score(self) -> float | None:
        if self._weight <= 0:
            return None
        shift, var_z = self._moments()
        score = float(np.abs(shift).mean() + np.abs(self._log_ratio(var_z)).mean())
        return score if math.isfinite(score) else None


class DriftCollector(Collector):
    """``foldserve_input_drift_score`` and ``..._samples`` of every loaded version, read from
    the monitors at scrape time (as of their last fold, at most ``FOLD_EVERY_S`` old).

    NOTE: with ``--workers`` /metrics pools the workers' files, which a collector cannot join:
    there the drift gauges are absent and ``GET /models/{name}/drift`` answers with the statistics
    of the worker that takes the request (its share of the traffic).
    """

    def __init__(self, source: Callable[[], Iterable[tuple[str, int, DriftMonitor]]]) -> None:
        self._source = source  # (model, version, monitor) of every version loaded

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "version"]
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
        for name, version, monitor in self._source():
            if monitor.available:
                value, count = monitor.latest
                score.add_metric([name, str(version)], math.nan if value is None else value)
                samples.add_metric([name, str(version)], count)
        yield score
        yield samples
