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

Hidden layers: a BatchNorm right after the first Linear or Conv2d (behind the input BatchNorm or
on the raw input) normalizes an affine map of the raw input; the manifest keeps its statistics
and the exporter the composed map (``service.store.HiddenStatistics``, ``service.monitor_maps``).
Each fold takes the same sampled rows through it (the weighted sums of the hidden BN's input and
its square follow from the rows' first and second moments: no (rows, C, positions) array) and
scores them the same way, against the same threshold; the decayed sample count is shared.

Cost on the request path: ``observe`` appends the request's validated array to a pending list;
the arithmetic runs later on the event loop, for everything pending at once, at most every
``FOLD_EVERY_S`` (or inline when pending data passes ``MAX_PENDING_BYTES``), on the newest
``MAX_FOLD_ROWS`` rows at most (heavy traffic is sampled). The statistics are only observed:
nothing here touches the model or the request's answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.backends import Array
from service.drift_moments import FeatureDrift, HiddenLayer, Moments
from service.monitor_maps import load_map
from service.store import InputStatistics, Manifest

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 0.5
DEFAULT_WINDOW = 2000  # samples; about one digits test set and a half
MIN_SAMPLES = 100  # below this, sampling noise alone can push the score near the threshold
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
class HiddenDrift:
    """One hidden BatchNorm's input (the raw rows mapped through ``map``) against its statistics."""

    layer: str
    map: str  # linear | conv2d
    axis: str
    source: str
    score: float | None
    drifted: bool
    samples: float
    features: list[FeatureDrift]


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
    hidden: list[HiddenDrift] = field(default_factory=list)


class DriftMonitor:
    """Streaming moments of one model version's inputs (and of the hidden BatchNorms' inputs
    mapped from them); see the module docstring.

    NOTE: call every method on the event loop's thread (or, without a loop, one thread): the
    pending list is swapped without a lock. ``latest`` and ``latest_hidden`` are each one
    assignment, safe to read from any thread (the Prometheus collector).
    """

    def __init__(
        self,
        reference: InputStatistics | None,
        *,
        hidden: Sequence[HiddenLayer] = (),
        threshold: float = DEFAULT_THRESHOLD,
        window: int = DEFAULT_WINDOW,
        max_fold_rows: int | None = MAX_FOLD_ROWS,
    ) -> None:
        self.reference, self.threshold, self.window = reference, threshold, window
        self.hidden = tuple(hidden)
        self._max_fold_rows = max_fold_rows  # None: every row counts (exact, for tests)
        self._decay = 1.0 - 1.0 / window
        self._pending: list[Array] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._weight = 0.0  # decayed sample count
        self.latest: tuple[float | None, float] = (None, 0.0)  # (score, samples) at the last fold
        self.latest_hidden: tuple[tuple[str, float | None], ...] = tuple(
            (layer.statistics.layer, None) for layer in self.hidden
        )  # (layer, score) at the last fold; samples as in ``latest``
        self._input = None if reference is None else Moments(reference)
        self._hidden = [Moments(layer.statistics) for layer in self.hidden]

    @classmethod
    def for_manifest(
        cls,
        manifest: Manifest,
        threshold: float = DEFAULT_THRESHOLD,
        directory: Path | None = None,
    ) -> DriftMonitor:
        """The monitor of one version; its hidden layers' maps are read from ``directory`` (none
        without it). Raises VerificationError for a side file that does not check out."""
        hidden = (
            [
                HiddenLayer(record, load_map(directory, record, manifest))
                for record in manifest.hidden_statistics
            ]
            if directory is not None
            else []
        )
        return cls(manifest.input_statistics, hidden=hidden, threshold=threshold)

    @property
    def available(self) -> bool:
        return self.reference is not None

    def observe(self, rows: Array) -> None:
        """Note one request's validated rows (n, *sample shape); never raises, O(1) here."""
        if self._input is None and not self._hidden:
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
        hidden = self._hidden_reports()
        ref = self.reference
        if ref is None or self._input is None:
            return DriftReport(
                False, NO_INPUT_BN, None, None, None, None, self.threshold, False,
                self._weight, self.window, [], hidden,
            )  # fmt: skip
        score, samples = self.latest
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
            features=self._input.features(self._weight),
            hidden=hidden,
        )

    def drifted(self) -> bool:
        return self._verdict(self.latest[0])

    def _verdict(self, score: float | None) -> bool:
        return score is not None and self.latest[1] >= MIN_SAMPLES and score > self.threshold

    def _hidden_reports(self) -> list[HiddenDrift]:
        reports = []
        for layer, moments, (_, score) in zip(
            self.hidden, self._hidden, self.latest_hidden, strict=True
        ):
            stats = layer.statistics
            reports.append(
                HiddenDrift(
                    layer=stats.layer,
                    map=stats.map,
                    axis=stats.axis,
                    source=stats.source,
                    score=score,
                    drifted=self._verdict(score),
                    samples=self.latest[1],
                    features=moments.features(self._weight),
                )
            )
        return reports

    def fold_pending(self) -> None:
        """Add every pending row to the decayed sums, in one vectorized pass."""
        self._scheduled = False
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending or (self._input is None and not self._hidden):
            return
        rows = np.concatenate(self._newest(pending))  # validated: each (n_i, *sample shape)
        n = len(rows)
        # Row j of n weighs decay^(n - 1 - j): the newest 1, as if folded one row at a time.
        weights = self._decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
        keep = self._decay**n
        # NOTE: a failure part way (caught by _fold_safely) resets every layer, so no layer's
        # sums ever hold rows that another's lack.
        if self._input is not None:
            self._input.add(rows, weights, keep)
        for layer, moments in zip(self.hidden, self._hidden, strict=True):
            moments.add_mapped(layer, rows, weights, keep)
        self._weight = self._weight * keep + float(weights.sum())
        self.latest = (
            None if self._input is None else self._input.score(self._weight),
            self._weight,
        )
        self.latest_hidden = tuple(
            (layer.statistics.layer, moments.score(self._weight))
            for layer, moments in zip(self.hidden, self._hidden, strict=True)
        )

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
            self.latest_hidden = tuple((name, None) for name, _ in self.latest_hidden)
            for moments in (self._input, *self._hidden):
                if moments is not None:
                    moments.reset()
