"""Parallel runs: a batch's rows split across concurrent one-thread runs (service.parallel_runs),
in the batcher and as chosen at load on real onnxruntime sessions."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.backends import Array, BackendOptions, load_backend
from service.batching import Batcher
from service.errors import BackendError, ConfigError, ModelNotReady
from service.loader import load_version
from service.packing import Signature
from service.parallel_runs import choose_parallel_runs, split
from service.settings import Settings
from service.store import read_manifest
from service.verify import golden_inputs
from tests.service.test_batching import Obs, f, poison, poisoned, rows

STORE = Path(__file__).resolve().parents[2] / "model_store"


class Concurrent:
    """A one-thread stand-in that records how many of its calls overlapped and in which threads."""

    def __init__(self, fn=f, seconds: float = 0.05) -> None:  # type: ignore[no-untyped-def]
        self.fn, self.seconds = fn, seconds
        self.lock = threading.Lock()
        self.inside = self.most = 0
        self.threads: set[int] = set()
        self.sizes: list[int] = []

    def __call__(self, x: Array) -> Array:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.threads.add(threading.get_ident())
            self.sizes.append(len(x))
        try:
            time.sleep(self.seconds)
            return self.fn(x)
        finally:
            with self.lock:
                self.inside -= 1


def test_split_keeps_every_row_in_order_in_at_most_runs_parts() -> None:
    x = rows(7)
    parts = split(x, 3)
    assert [len(p) for p in parts] == [3, 2, 2]
    np.testing.assert_array_equal(np.concatenate(parts), x)
    assert [len(p) for p in split(rows(1), 4)] == [1]


def test_queued_requests_run_as_one_thread_runs_at_once_and_a_lone_row_on_every_thread() -> None:
    async def main() -> None:
        wide, narrow, obs = Concurrent(), Concurrent(), Obs()
        b = Batcher(
            wide, max_batch_size=8, max_delay_ms=50, parallel_run=narrow, parallel_runs=2,
            stats=obs,
        )  # fmt: skip
        await b.start()
        xs = [rows(1, 100 * i) for i in range(4)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out, f(x))
        assert narrow.most == 2 and len(narrow.threads) == 2  # two runs at the same time
        assert sorted(narrow.sizes) == [2, 2] and wide.sizes == []  # each its share
        assert sorted(n for n, _ in obs.batches) == [2, 2]
        # A lone one-row request keeps the session with every thread: one row cannot split.
        np.testing.assert_array_equal(await b.submit(rows(1, 7)), f(rows(1, 7)))
        assert wide.sizes == [1]
        await b.stop()

    asyncio.run(main())


def test_a_request_split_across_runs_gets_its_rows_in_order_when_a_later_run_ends_first() -> None:
    def slow_first(x: Array) -> Array:
        time.sleep(0.15 if x[0, 0] == 0 else 0.0)  # the request's first rows finish last
        return f(x)

    async def main() -> None:
        narrow = Concurrent(slow_first, 0.0)
        b = Batcher(f, max_batch_size=4, max_delay_ms=1, parallel_run=narrow, parallel_runs=2)
        await b.start()
        x = rows(8)
        np.testing.assert_array_equal(await b.submit(x), f(x))
        assert narrow.sizes == [4, 4] and narrow.most == 2
        await b.stop()

    asyncio.run(main())


def test_stop_answers_every_request_in_runs_going_at_once() -> None:
    async def main() -> None:
        narrow = Concurrent(f, 0.1)
        b = Batcher(f, max_batch_size=2, max_delay_ms=1, parallel_run=narrow, parallel_runs=2)
        await b.start()
        xs = [rows(2, 10 * i) for i in range(5)]
        pending = [asyncio.ensure_future(b.submit(x)) for x in xs]
        await asyncio.sleep(0.02)  # runs under way, more queued
        await b.stop()
        for x, p in zip(xs, pending, strict=True):
            np.testing.assert_array_equal(p.result(), f(x))
        assert narrow.most == 2

    asyncio.run(main())


def test_a_stop_that_overruns_fails_what_the_runs_never_answered() -> None:
    async def main() -> None:
        narrow = Concurrent(f, 1.0)
        b = Batcher(f, max_batch_size=1, max_delay_ms=1, parallel_run=narrow, parallel_runs=2)
        await b.start()
        pending = [asyncio.ensure_future(b.submit(rows(1, i))) for i in range(3)]
        await asyncio.sleep(0.05)
        await b.stop(timeout_s=0.1)
        assert all(isinstance(p.exception(), ModelNotReady) for p in pending)

    asyncio.run(main())


def test_a_failing_one_thread_run_fails_only_the_request_whose_rows_broke_it() -> None:
    async def main() -> None:
        narrow = Concurrent(poisoned, 0.0)
        b = Batcher(
            Concurrent(poisoned, 0.0), max_batch_size=6, max_delay_ms=60_000,
            parallel_run=narrow, parallel_runs=2,
        )  # fmt: skip
        await b.start()
        xs = [rows(3), poison(1), rows(1, 50), poison(1)]
        results = await asyncio.gather(*(b.submit(x) for x in xs), return_exceptions=True)
        np.testing.assert_array_equal(results[0], f(xs[0]))
        np.testing.assert_array_equal(results[2], f(xs[2]))
        assert all(isinstance(r, BackendError) for r in results[1::2])
        await b.stop()

    asyncio.run(main())


def test_parallel_runs_without_a_run_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="parallel_runs"):
        Batcher(f, max_batch_size=4, max_delay_ms=1, parallel_runs=2)


def _backends(name: str, threads: int):  # type: ignore[no-untyped-def]
    directory = STORE / name / "1"
    manifest = read_manifest(directory)
    path = directory / "model.onnx"
    signature = Signature.of(manifest)
    wide = load_backend("onnx", path, BackendOptions("cpu", threads), signature)
    return manifest, wide, lambda: load_backend("onnx", path, BackendOptions("cpu", 1), signature)


def test_set_by_the_setting_after_the_bitwise_check_on_real_sessions() -> None:
    manifest, wide, narrow = _backends("digits-cnn", 2)
    chosen = choose_parallel_runs(
        Settings(parallel_runs=2, device="cpu"), wide, narrow, manifest, 2, 2
    )
    assert chosen.runs == 2 and chosen.run is not None and "parallel_runs" in chosen.reason
    golden = golden_inputs(manifest)
    x = np.ascontiguousarray(np.resize(golden, (5, *golden.shape[1:])))
    np.testing.assert_array_equal(np.concatenate([chosen.run(p) for p in split(x, 2)]), wide.run(x))


def test_refused_when_the_one_thread_session_differs_in_a_single_bit() -> None:
    manifest, wide, open_narrow = _backends("digits-cnn", 2)

    class Off:
        format, device = "onnx", "cpu"

        def __init__(self) -> None:
            self.inner = open_narrow()

        def run(self, x: Array) -> Array:
            out = self.inner.run(x)
            return np.nextafter(out, np.float32(np.inf))

    chosen = choose_parallel_runs(
        Settings(parallel_runs=2, device="cpu"), wide, Off, manifest, 2, 2
    )
    assert chosen.runs == 1 and chosen.run is None and "bit for bit" in chosen.reason


@pytest.mark.parametrize(
    ("setting", "threads", "why"),
    [(1, 2, "FOLDSERVE_PARALLEL_RUNS=1"), (None, 1, "one intra-op thread")],
)
def test_off_when_set_to_one_or_the_model_has_one_thread(
    setting: int | None, threads: int, why: str
) -> None:
    manifest, wide, narrow = _backends("digits-mlp", threads)
    chosen = choose_parallel_runs(
        Settings(parallel_runs=setting, device="cpu"), wide, narrow, manifest, threads, 2
    )
    assert chosen.runs == 1 and why in chosen.reason


def test_auto_for_a_model_given_several_threads_unless_the_threads_were_set() -> None:
    manifest, wide, narrow = _backends("digits-cnn", 2)
    auto = choose_parallel_runs(Settings(device="cpu"), wide, narrow, manifest, 2, 2)
    assert auto.runs == 2 and auto.run is not None and "auto" in auto.reason
    chosen = choose_parallel_runs(
        Settings(device="cpu", intra_op_threads=2), wide, narrow, manifest, 2, 2
    )
    assert chosen.runs == 1 and "intra_op_threads is set" in chosen.reason


def test_a_torchscript_version_keeps_one_run() -> None:
    manifest, wide, narrow = _backends("digits-cnn", 2)

    class TorchScript:
        format, device = "torchscript", "cpu"

        def run(self, x: Array) -> Array:
            return wide.run(x)

    chosen = choose_parallel_runs(Settings(device="cpu"), TorchScript(), narrow, manifest, 2, 2)
    assert chosen.runs == 1 and "onnxruntime on the CPU only" in chosen.reason


def test_a_loaded_version_reports_its_choice(tmp_path: Path) -> None:
    settings = Settings(
        model_store=STORE, intra_op_threads=2, parallel_runs=2, device="cpu", inline_max_ms=0
    )
    loaded = load_version(settings, STORE / "digits-cnn" / "1", "digits-cnn", 1, 2)
    assert loaded.batching.parallel_runs == 2 and loaded.parallel.run is not None
    assert "FOLDSERVE_PARALLEL_RUNS" in loaded.batching.parallel_reason


def test_the_wait_estimate_counts_rows_ahead_at_the_runs_pace_not_full_batches() -> None:
    # Admission refuses by this estimate: a batch of parallel runs is a share of the queue, so
    # counting "one batch per cap" would promise 40 rows in the time of the last 2-row run.
    def per_row(x: Array) -> Array:
        time.sleep(0.02 * len(x))
        return f(x)

    async def main() -> None:
        b = Batcher(f, max_batch_size=64, max_delay_ms=20, parallel_run=per_row, parallel_runs=2)
        await b.start()
        xs = [rows(1, i) for i in range(4)]
        await asyncio.gather(*(b.submit(x) for x in xs))  # two runs of 2 rows, 40 ms each
        estimate = b.estimated_wait(40)
        assert 0.3 < estimate < 0.6, estimate  # 40 rows at 10 ms a row for both runs together
        await b.stop()

    asyncio.run(main())
