"""How one version is batched and run: its row cap, delay and queue bound (settings, then the
manifest), its threads (from the CPUs and the model's measured speed), and whether it runs on
the event loop (a full batch measured at load). Decided once, at load, off the event loop."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service.backends import Backend
from service.errors import ConfigError
from service.packing import packing
from service.settings import BatchingOverride, Settings, setting_ref
from service.store import Manifest
from service.verify import golden_inputs

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# NOTE: one row slower than this on one thread gains from more threads (onnxruntime splits each
# operator's work); faster ones lose to the threads' hand-offs. Measured here: digits-mlp takes
# 0.03 ms a row, a MONAI ResNet-50 at 3x224x224 about 190 ms, a 2-D UNet at 256x256 about 10 ms.
THREADS_FROM_MS = 1.0
_TIMING_RUNS = 7
_TIMING_BUDGET_S = 1.0
# NOTE: a batch holds every row's activations at once: for a MONAI ResNet-50 at 3x224x224 the
# manifest's 27 rows grew onnxruntime's arena to 1.9 GiB of RSS, for as many images per second
# as one row at a time on this CPU (a batch of 8: 1.00-1.02x). A slow model keeps the
# manifest's cap only if a batch measurably buys speed here.
BATCH_GAIN = 1.1
PROBE_ROWS = 8


@dataclass(frozen=True)
class Plan:
    """A version's batching as settings and manifest decide it, before anything is timed."""

    max_batch_size: int
    max_delay_ms: float
    max_queue_rows: int
    queue_limit: str  # the setting that bounds the queue, named as an error message names it


@dataclass(frozen=True)
class BatchingChoice:
    """What was chosen for one version's batcher, for /models and the logs."""

    max_batch_size: int
    max_delay_ms: float
    adaptive_delay: bool
    full_batch_ms: float  # measured at load; below inline_max_ms the model runs inline
    max_queue_rows: int  # max_queue_rows, or fewer when max_queue_bytes holds fewer samples
    queue_limit: str
    threads: int  # onnxruntime's intra-op threads for this version
    parallel_runs: int = 1  # one-thread runs a batch of 2 rows or more is split into
    parallel_reason: str = ""  # why that many (service.parallel_runs)

    def inline(self, settings: Settings) -> bool:
        return self.full_batch_ms < settings.inline_max_ms


def plan(settings: Settings, name: str, version: int, manifest: Manifest) -> Plan:
    """Row cap and delay (a per-model override beats the global one, then the manifest) and the
    queue bound (the lower of max_queue_rows and what max_queue_bytes holds)."""
    s, m = settings, manifest.batching
    own = s.model_batching.get(name, BatchingOverride())
    cap = _first(own.max_batch_size, s.max_batch_size, m.max_batch_size)
    delay = _first(own.max_delay_ms, s.max_delay_ms, m.max_delay_ms)
    # NOTE: the batcher queues validated rows, which are float32.
    sample_bytes = packing(manifest.inputs).nbytes
    by_bytes = s.max_queue_bytes // sample_bytes
    bytes_limit = setting_ref("max_queue_bytes", s.max_queue_bytes)
    if by_bytes < 1:
        raise ConfigError(
            f"{bytes_limit} cannot hold one sample of this model ({sample_bytes} bytes of "
            f"float32 input): raise it to at least {sample_bytes}"
        )
    if by_bytes < s.max_queue_rows:
        rows, limit = by_bytes, f"{bytes_limit}, {sample_bytes} bytes per sample"
    else:
        rows, limit = s.max_queue_rows, setting_ref("max_queue_rows", s.max_queue_rows)
    if rows < cap:
        log.warning(
            "model %s v%s: at most %d rows can queue (%s), fewer than max_batch_size=%d: "
            "batches will not fill",
            name,
            version,
            rows,
            limit,
            cap,
        )
    return Plan(cap, delay, rows, limit)


@dataclass(frozen=True)
class RowCap:
    rows: int
    why: str


def row_cap(
    settings: Settings,
    name: str,
    planned: int,
    one_row_ms: float,
    open_probe: Callable[[], Backend],
    manifest: Manifest,
) -> RowCap:
    """The row cap to serve with: the planned one (settings, else the manifest's), or 1 for a
    slow model (one row takes THREADS_FROM_MS or more) whose batch of up to PROBE_ROWS rows
    gives under BATCH_GAIN times the rows per second of one row, timed at load on a probe
    session without an arena (what it allocates goes with it, not into the served session)."""
    own = settings.model_batching.get(name, BatchingOverride()).max_batch_size
    if own is not None or settings.max_batch_size is not None:
        return RowCap(planned, "set")
    if not settings.measure_batching or planned <= 1 or one_row_ms < THREADS_FROM_MS:
        return RowCap(planned, "the manifest's")
    rows = min(planned, PROBE_ROWS)
    golden = golden_inputs(manifest)
    batch = np.ascontiguousarray(np.resize(golden, (rows, *golden.shape[1:])))
    gain = _batch_gain(open_probe(), batch)  # the probe session is dropped on return
    measured = f"a batch of {rows} rows ran {gain:.2f}x the rows per second of one row here"
    if gain >= BATCH_GAIN:
        return RowCap(planned, f"{measured}: the manifest's {planned} kept")
    return RowCap(
        1,
        f"{measured}: one row per run (the manifest allows {planned}; a batch's memory would "
        f"buy under {BATCH_GAIN}x; {setting_ref('measure_batching', False)} or "
        "max_batch_size keeps it)",
    )


def _batch_gain(probe: Backend, batch: np.ndarray) -> float:
    """Rows per second of ``batch`` in one run over those of one row alone."""
    one = _typical_s(lambda: probe.run(batch[:1]))
    many = _typical_s(lambda: probe.run(batch))
    return (len(batch) / many) * one if many > 0 else 0.0


def _typical_s(call: Callable[[], object]) -> float:
    """The median of warm calls, at least 3 and a quarter of a second of them: one call of a
    model taking milliseconds varies by more than the gain it must tell (measured: best-of-2
    called a UNet's batch of 8 0.88x one time and over 1.1x the next)."""
    call()  # the first call of a shape allocates: not timed
    times: list[float] = []
    while len(times) < 3 or (sum(times) < 0.25 and len(times) < 50):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def threads_for(settings: Settings, one_row_ms: float, cpus: int) -> int:
    """intra_op_threads when set; else every usable CPU for a model slow enough to gain from
    them, one thread for the others."""
    if settings.intra_op_threads is not None:
        return settings.intra_op_threads
    return cpus if one_row_ms >= THREADS_FROM_MS else 1


def one_row_ms(backend: Backend, manifest: Manifest) -> float:
    """One warm run of one golden row, in milliseconds (the first run allocates: not timed)."""
    row = np.ascontiguousarray(golden_inputs(manifest)[:1])
    backend.run(row)
    started = time.perf_counter()
    backend.run(row)
    return (time.perf_counter() - started) * 1000.0


def full_batch_ms(backend: Backend, manifest: Manifest, rows: int) -> float:
    """Median of a few warm runs of one full batch (golden inputs repeated).

    The median, not the best: the decision to block the event loop should not rest on luck.
    Seven runs, or fewer once they took a second: the time only decides whether a model is fast
    enough (inline_max_ms, under a millisecond) to run on the event loop, and a batch of large
    images that takes seconds has answered that in one run.
    """
    golden = golden_inputs(manifest)
    batch = np.ascontiguousarray(np.resize(golden, (rows, *golden.shape[1:])))
    backend.run(batch)  # warm-up: first runs allocate
    times: list[float] = []
    while len(times) < _TIMING_RUNS and sum(times) < _TIMING_BUDGET_S:
        started = time.perf_counter()
        backend.run(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def _first(*values: _T | None) -> _T:
    """The first value that is set; the last one (the manifest's) always is."""
    return next(v for v in values if v is not None)
