"""Parallel runs: a batch's rows split across concurrent one-thread runs of a second session.

onnxruntime splits each operator of one run across its intra-op threads, and those threads meet
at every operator. On this project's 2 cores (``bench/session_modes.py``) a MONAI 2-D UNet at
1x256x256 gives 240-258 images per second on one session with 2 threads (one image per run, or 2
or 4), but 285-291 as two one-thread runs side by side, each on its own core with nothing to wait
for, and 211 as two callers of the 2-thread session; a MONAI ResNet-50 at 3x224x224 9.5-10.4
against 9.8-9.9 (``bench/run --only real`` measures the served figures). So
a version whose model earned several threads (one row takes ``THREADS_FROM_MS`` or more) gets a
second, one-thread session: a lone one-row batch still runs on every thread (one sample cannot be
split), and requests that queue meanwhile go to up to ``runs`` one-thread runs at once, each
taking its share of the queue, in worker threads of their own (``service.batching``). The second
session costs its weights once more (110 MiB of RSS for the ResNet-50) and an arena for the rows
its runs take.

Chosen once per version at load, off the event loop: only for onnxruntime on the CPU (TorchScript
shares one thread pool per process), and only when the split gives bit for bit the outputs of the
whole batch on all threads for the golden rows: else a request's answer would depend on whether
it had batch mates. Not timed at load: versions load side by side, and a split timed while
another version loads cannot show its gain (measured: 1.05x for the UNet then).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.backends import Array, Backend
from service.settings import Settings, setting_ref
from service.store import Manifest
from service.verify import golden_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelRuns:
    """How a version's batches of two rows or more run: ``runs`` one-thread runs at once
    (1: one run on every thread, the only way without a second session)."""

    runs: int
    run: Callable[[Array], Array] | None  # the one-thread session; None when runs == 1
    reason: str  # why, for the log and /models

    @classmethod
    def off(cls, reason: str) -> ParallelRuns:
        return cls(1, None, reason)


def split(batch: Array, runs: int) -> list[Array]:
    """The rows of ``batch`` in at most ``runs`` contiguous parts, as even as rows allow."""
    return [part for part in np.array_split(batch, min(runs, len(batch))) if len(part)]


def choose_parallel_runs(
    settings: Settings,
    wide: Backend,
    open_narrow: Callable[[], Backend],
    manifest: Manifest,
    threads: int,
    cpus: int,
) -> ParallelRuns:
    """Parallel runs for one loaded version (``wide``: its session with ``threads`` threads,
    given because one row took ``THREADS_FROM_MS`` or more, or as set)."""
    wanted = settings.parallel_runs
    if wanted == 1:
        return ParallelRuns.off(setting_ref("parallel_runs", 1))
    if wide.format != "onnx" or wide.device != "cpu":
        return ParallelRuns.off("onnxruntime on the CPU only")
    if wanted is None and (threads < 2 or settings.intra_op_threads is not None):
        why = "one intra-op thread" if threads < 2 else "intra_op_threads is set"
        return ParallelRuns.off(f"{why}; set parallel_runs to split batches")
    runs = wanted or min(threads, cpus)
    # NOTE: a one-thread version needs no second session: concurrent calls on its own session
    # each run in the calling thread.
    narrow = wide if threads == 1 else open_narrow()
    golden = np.ascontiguousarray(golden_inputs(manifest))
    rows = np.ascontiguousarray(np.resize(golden, (max(runs, len(golden)), *golden.shape[1:])))
    with concurrent.futures.ThreadPoolExecutor(runs, thread_name_prefix="foldserve-probe") as pool:
        whole = wide.run(rows)
        parts = run_split(pool, narrow.run, rows, runs)
    if not np.array_equal(whole, parts, equal_nan=True):
        return ParallelRuns.off(
            f"{runs} one-thread runs do not give bit for bit the outputs of one "
            f"{threads}-thread run (max difference {_max_diff(whole, parts):.3g})"
        )
    why = (
        setting_ref("parallel_runs", wanted)
        if wanted is not None
        else f"auto: the model has {threads} intra-op threads"
    )
    return ParallelRuns(runs, narrow.run, f"{why}; the same outputs bit for bit")


def run_split(
    pool: concurrent.futures.Executor, run: Callable[[Array], Array], rows: Array, runs: int
) -> Array:
    """``rows`` through ``run`` in parts at once, blocking (load-time probes only)."""
    futures = [pool.submit(run, part) for part in split(rows, runs)]
    return np.concatenate([f.result() for f in futures])


def _max_diff(a: Array, b: Array) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
