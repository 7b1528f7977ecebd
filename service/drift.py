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
A layer is ``drifted`` when ``score > threshold`` (``drift_threshold``, default 0.5) with at
least ``MIN_SAMPLES`` samples in its window.

NOTE: the floor, not the BN's eps (1e-5), keeps features that were (almost) constant in training
from ruling the mean through sampling noise: digits' border pixels have variance 0, and one
stray 1 there would read as 300 standard deviations. A feature whose variance is below 1% of the
average is thus measured against the floor; the per-feature detail still shows it. Measured on
the shipped digits-mlp (docs/drift.md): the held-out digits score 0.11, any 100 of them at most
0.3; pixels x1.2 score 0.53, x1.5 + 1 1.8, inverted 9.

Window: every sample's weight decays by ``1 - 1 / window`` per later sample of the same layer
(exactly, also within one fold), so ``samples`` (the sum of weights) tends to ``window`` and data
``window`` samples old weighs e^-1. Memory is a few vectors per layer, whatever the traffic.

Hidden layers: a BatchNorm right after the first Linear or Conv2d (behind the input BatchNorm or
on the raw input) normalizes an affine map of the raw input; the manifest keeps its statistics
and the exporter the composed map (``service.store.HiddenStatistics``, ``service.monitor_maps``).
The monitor maps rows through it and scores them the same way, against the same threshold.

Cost: ``observe`` (on the event loop, for every answered request) only copies the request's rows
into a buffer of pending rows (``service.drift_pending``), under a lock held for that; it keeps
the first rows after each fold, at most ``MAX_PENDING_BYTES`` (bounded memory), and only counts
the rest. Everything else runs in
the process's one fold thread
(``service.drift_thread``), ``FOLD_EVERY_S`` after the first pending request: each layer takes
the newest rows its share of ``budget`` (a fraction of one core per monitor, ``CPU_BUDGET``,
split evenly between its layers) pays for, at its measured cost per row
(``service.drift_budget``): the cost is bounded by what a layer computes per row, never by its
weight count. Cheap layers (digits-mlp: 3 µs a row, both layers) take every row of realistic
traffic; a ResNet-50's 7x7 stem over 112x112 positions takes an image every second or so, and
its ``samples`` say how many it holds. ``report`` reads the sums as of the last fold.

Robustness: any finite input keeps the sums finite (``service.drift_moments.Z_LIMIT``): a huge
row reads as very drifted and decays out of the window like any other. A layer whose sums still
turn non-finite, or whose arithmetic fails, is reset alone; the report counts ``resets`` and
keeps the last reason, and the log says it once (at most once a minute per monitor). The
statistics are only observed: nothing here touches the model or the request's answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from service.backends import Array
from service.drift_budget import CpuBudget
from service.drift_layer import HiddenLayer, MonitoredLayer, Rows
from service.drift_pending import MAX_ROWS, PendingRows
from service.drift_report import DriftReport, HiddenDrift, Published, ResetNote
from service.drift_thread import FoldThread, shared
from service.monitor_maps import load_map
from service.store import InputStatistics, Manifest

log = logging.getLogger(__name__)
DEFAULT_THRESHOLD = 0.5
DEFAULT_WINDOW = 2000  # samples; about one digits test set and a half
MIN_SAMPLES = 100  # below this, sampling noise alone can push the score near the threshold
FOLD_EVERY_S = 0.25
MAX_PENDING_BYTES = 4 << 20  # per monitor (two rings of at most this, taking turns)
CPU_BUDGET = 0.02  # of one core, per monitor (model version), all its layers together
RESET_LOG_S = 60.0  # one log line per monitor at most this often, however often it resets
NON_FINITE = "its sums turned non-finite"
NO_INPUT_BN = (
    "the manifest records no input BatchNorm statistics: the model has no BatchNorm on its "
    "input (or was exported before foldserve kept them), so there is no reference to compare with"
)


class DriftMonitor:
    """Streaming moments of one model version's inputs (and of the hidden BatchNorms' inputs
    mapped from them); see the module docstring. ``observe`` and ``report`` may be called from
    any thread; the arithmetic runs in the fold thread only."""

    def __init__(
        self,
        reference: InputStatistics | None,
        *,
        hidden: Sequence[HiddenLayer] = (),
        threshold: float = DEFAULT_THRESHOLD,
        window: int = DEFAULT_WINDOW,
        budget: float | None = CPU_BUDGET,
        thread: FoldThread | None = None,
        name: str = "a model",
    ) -> None:
        self.reference, self.threshold, self.window = reference, threshold, window
        self.hidden, self.budget, self.name = tuple(hidden), budget, name
        self._offset = 0 if reference is None else 1  # of the hidden layers in ``_layers``
        share = None if budget is None else budget / (self._offset + len(self.hidden) or 1)

        def bucket() -> CpuBudget | None:  # the budget is split evenly between the layers
            return None if share is None else CpuBudget(share)

        self._input = None if reference is None else MonitoredLayer.of_input(
            reference, window, bucket()
        )  # fmt: skip
        self._layers = [
            *([self._input] if self._input is not None else []),
            *(MonitoredLayer.of_hidden(layer, window, bucket()) for layer in self.hidden),
        ]
        self._thread = thread
        # As many rows as the bytes allow when every row is to be folded (no budget); else
        # what a fold can take.
        self._pending = (
            PendingRows(MAX_PENDING_BYTES, None, None)
            if budget is None
            else PendingRows(MAX_PENDING_BYTES, MAX_ROWS)
        )
        self._published = Published(
            tuple(layer.sums for layer in self._layers), (None,) * len(self._layers)
        )
        self._logged_at = -RESET_LOG_S

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
        return cls(
            manifest.input_statistics,
            hidden=hidden,
            threshold=threshold,
            name=f"{manifest.name} v{manifest.version}",
        )

    @property
    def available(self) -> bool:
        return self.reference is not None

    @property
    def latest(self) -> tuple[float | None, float]:
        """(score, samples) of the input layer as of the last fold."""
        published = self._published
        if self._input is None:
            return None, 0.0
        return published.scores[0], published.sums[0].weight

    @property
    def latest_hidden(self) -> tuple[tuple[str, float | None, float], ...]:
        """(layer, score, samples) of every hidden layer as of the last fold."""
        published, at = self._published, self._offset
        return tuple(
            (layer.statistics.layer, published.scores[at + i], published.sums[at + i].weight)
            for i, layer in enumerate(self.hidden)
        )

    def observe(self, rows: Array) -> None:
        """Note one request's validated rows (n, *sample shape); O(1), never raises."""
        if self._layers and self._pending.add(rows):
            (self._thread or shared()).submit(self._scheduled_fold, FOLD_EVERY_S)

    def flush(self, timeout: float = 10.0) -> bool:
        """Fold everything observed so far and wait for it (tests, benchmarks; it blocks: not
        on the event loop). False if the fold thread did not get to it within ``timeout``."""
        if not self._layers:
            return True
        done = threading.Event()

        def fold_then_say() -> None:
            try:
                self._fold(self._pending.take(scheduled=False))
            finally:
                done.set()

        (self._thread or shared()).submit(fold_then_say)
        return done.wait(timeout)

    def close(self) -> None:
        """Stop taking rows and drop the pending ones (a retired version); optional: a monitor
        no longer observed costs nothing after its last fold."""
        self._pending.close()

    def report(self) -> DriftReport:
        """The state as of the last fold: O(features), no arithmetic over rows."""
        published, ref, layer = self._published, self.reference, self._input
        sums = published.sums[0] if layer is not None else None
        score = published.scores[0] if layer is not None else None
        return DriftReport(
            available=ref is not None,
            reason=None if ref is not None else NO_INPUT_BN,
            layer=None if ref is None else ref.layer,
            axis=None if ref is None else ref.axis,
            source=None if ref is None else ref.source,
            score=score,
            threshold=self.threshold,
            drifted=sums is not None and self._verdict(score, sums.weight),
            samples=0.0 if sums is None else sums.weight,
            window=self.window,
            features=[] if layer is None or sums is None else layer.moments.features(sums),
            hidden=self._hidden_reports(published),
            samples_observed=self._pending.observed,
            samples_folded=0 if sums is None else sums.rows,
            cpu_budget=self.budget,
            resets=published.resets,
            last_reset=published.last_reset,
        )

    def drifted(self) -> bool:
        score, samples = self.latest
        return self._verdict(score, samples)

    def _verdict(self, score: float | None, samples: float) -> bool:
        return score is not None and samples >= MIN_SAMPLES and score > self.threshold

    def _hidden_reports(self, published: Published) -> list[HiddenDrift]:
        reports, at = [], self._offset
        for i, (layer, monitored) in enumerate(zip(self.hidden, self._layers[at:], strict=True)):
            stats, sums, score = layer.statistics, published.sums[at + i], published.scores[at + i]
            reports.append(
                HiddenDrift(
                    layer=stats.layer,
                    map=stats.map,
                    axis=stats.axis,
                    source=stats.source,
                    score=score,
                    drifted=self._verdict(score, sums.weight),
                    samples=sums.weight,
                    samples_folded=sums.rows,
                    features=monitored.moments.features(sums),
                )
            )
        return reports

    def _scheduled_fold(self) -> None:
        self._fold(self._pending.take(scheduled=True))

    def _fold(self, pending: list[Array]) -> None:
        """In the fold thread: every layer takes what it can afford of the pending rows."""
        started, charged = time.thread_time(), 0.0
        rows = Rows(pending)
        if rows.count == 0:
            return
        published = self._published
        resets, last_reset = published.resets, published.last_reset
        for layer in self._layers:
            try:
                charged += layer.fold(rows)
                if not layer.sums.finite:  # cannot happen with finite rows: a net, said aloud
                    raise FloatingPointError(NON_FINITE)
            except Exception as exc:  # a monitoring bug must never fail a request or the thread
                layer.reset()
                resets += 1
                # The answer names the kind of failure only; the log has the whole story.
                why = NON_FINITE if isinstance(exc, FloatingPointError) else type(exc).__name__
                last_reset = ResetNote(layer.statistics.layer, why, time.time())
                self._say_reset(last_reset, exc)
        self._published = Published(
            tuple(layer.sums for layer in self._layers),
            tuple(layer.moments.score(layer.sums) for layer in self._layers),
            resets,
            last_reset,
        )
        # What no layer's rows caused (reading the pending list, scoring) is paid all the same.
        overhead = (time.thread_time() - started - charged) / len(self._layers)
        for layer in self._layers:
            if layer.budget is not None:
                layer.budget.debit(overhead)

    def _say_reset(self, note: ResetNote, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at < RESET_LOG_S:
            return  # counted in the report; the log already said it lately
        self._logged_at = now
        trace = None if isinstance(exc, FloatingPointError) else exc  # a bug: its traceback
        log.warning(
            "drift monitoring failed for %s: the statistics of %s were reset (%s); the drift "
            "report counts the resets",
            self.name, note.layer, note.reason if trace is None else f"{note.reason}: {exc}",
            exc_info=trace,
        )  # fmt: skip
