"""The batcher on its own: no HTTP, a numpy function standing in for the backend."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import batching
from service.backends import Array
from service.batching import Batcher
from service.errors import (
    BackendError,
    ConfigError,
    InferenceTimeout,
    InvalidInput,
    ModelNotReady,
)


def f(x: Array) -> Array:
    """Row-wise and deterministic, with an output shape unlike the input's."""
    flat = x.reshape(len(x), -1)
    return np.stack([flat.sum(axis=1), flat.max(axis=1) * 2 + 1], axis=1).astype(np.float32)


def rows(n: int, start: float = 0.0, width: int = 3) -> Array:
    return (np.arange(n * width, dtype=np.float32).reshape(n, width) + start).astype(np.float32)


class Recorder:
    """A backend that records every batch, optionally holding each run until released."""

    def __init__(self, fn: Callable[[Array], Array] = f, *, hold: bool = False) -> None:
        self.fn = fn
        self.batches: list[Array] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, x: Array) -> Array:
        self.batches.append(x.copy())
        self.entered.set()
        assert self.release.wait(5), "test forgot to release the backend"
        return self.fn(x)

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


class Obs:
    """Batch statistics (service.batching.BatchStats) that record what they are told."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, float]] = []
        self.depths: list[int] = []
        self.waits: list[float] = []

    def waited(self, seconds: float) -> None:
        self.waits.append(seconds)

    def ran(self, requests: int, rows: int, seconds: float) -> None:
        self.batches.append((rows, seconds))

    def gauge(self, queue_rows: int, estimated_wait_s: float) -> None:
        self.depths.append(queue_rows)


POISON = -7.0  # no rows() output holds it unless a test puts it there


def poisoned(x: Array) -> Array:
    """A backend that fails any batch holding the poison value, and is f otherwise."""
    if (x == POISON).any():
        raise RuntimeError("poisoned row")
    return f(x)


def poison(n: int, at: int = 0) -> Array:
    x = rows(n, 1000)
    x[at, 0] = POISON
    return x


def arun(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition never became true"
        await asyncio.sleep(0.001)


async def started(run: Callable[[Array], Array], **kw: Any) -> Batcher:
    opts: dict[str, Any] = {"max_batch_size": 64, "max_delay_ms": 2.0}
    b = Batcher(run, **(opts | kw))
    await b.start()
    return b


async def timed(aw: Awaitable[Array]) -> tuple[Array, float]:
    t0 = time.monotonic()
    out = await aw
    return out, time.monotonic() - t0


def test_lone_request_waits_for_the_deadline() -> None:
    async def main() -> None:
        b = await started(Recorder(), max_delay_ms=100)
        x = rows(1)
        out, took = await timed(b.submit(x))
        np.testing.assert_array_equal(out, f(x))
        assert 0.09 <= took < 2.0
        await b.stop()

    arun(main())


def test_full_batch_goes_without_waiting_for_the_deadline() -> None:
    async def main() -> None:
        run = Recorder()
        b = await started(run, max_batch_size=8, max_delay_ms=60_000)
        (_, took), (o2, _) = await asyncio.gather(
            timed(b.submit(rows(4))), timed(b.submit(rows(4, 100)))
        )
        assert took < 2.0 and run.sizes == [8]
        np.testing.assert_array_equal(o2, f(rows(4, 100)))
        await b.stop()

    arun(main())


def test_zero_delay_sends_whatever_is_queued_at_once() -> None:
    async def main() -> None:
        b = await started(Recorder(), max_delay_ms=0)
        _, took = await timed(b.submit(rows(1)))
        assert took < 1.0
        await b.stop()

    arun(main())


def test_concurrent_requests_merge_and_the_cap_counts_rows() -> None:
    async def main() -> None:
        run = Recorder()
        b = await started(run, max_batch_size=16, max_delay_ms=50)
        xs = [rows(5, 1000 * i) for i in range(20)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out, f(x))
        assert max(run.sizes) <= 16 and sum(run.sizes) == 100
        assert len(run.sizes) <= 8  # merged: 20 requests in at most ceil(100 / 16) + 1 runs
        await b.stop()

    arun(main())


def test_large_request_is_split_and_reassembled_in_order() -> None:
    async def main() -> None:
        run = Recorder()
        b = await started(run, max_batch_size=64)
        x = rows(150)
        out = await b.submit(x)
        assert run.sizes == [64, 64, 22]
        np.testing.assert_array_equal(out, f(x))
        await b.stop()

    arun(main())


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    yields=st.lists(st.integers(0, 3), min_size=12, max_size=12),
    cap=st.integers(1, 32),
    delay_ms=st.sampled_from([0.0, 1.0]),
)
def test_every_caller_gets_exactly_its_own_rows(
    sizes: list[int], yields: list[int], cap: int, delay_ms: float
) -> None:
    async def one(b: Batcher, x: Array, pause: int) -> Array:
        for _ in range(pause):  # stagger arrivals so batches form at different boundaries
            await asyncio.sleep(0)
        return await b.submit(x)

    async def main() -> None:
        run = Recorder()
        b = await started(run, max_batch_size=cap, max_delay_ms=delay_ms)
        xs = [rows(n, 10_000 * i) for i, n in enumerate(sizes)]
        outs = await asyncio.gather(*(one(b, x, p) for x, p in zip(xs, yields, strict=False)))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out, f(x))
        assert max(run.sizes) <= cap and sum(run.sizes) == sum(sizes)
        await b.stop()

    arun(main())


def test_a_failing_request_never_fails_its_batch_mates() -> None:
    async def main() -> None:
        obs, run = Obs(), Recorder(poisoned)
        # A full cap and a 60 s deadline: the four requests leave together, as one batch.
        b = await started(run, max_batch_size=6, max_delay_ms=60_000, stats=obs)
        xs = [rows(3), poison(1), rows(1, 50), poison(1)]
        results = await asyncio.gather(*(b.submit(x) for x in xs), return_exceptions=True)
        np.testing.assert_array_equal(results[0], f(xs[0]))
        np.testing.assert_array_equal(results[2], f(xs[2]))
        for r in results[1::2]:
            # The runtime's own text is for the log (detail), never for the client (message).
            assert isinstance(r, BackendError) and "poisoned row" not in r.message
            assert r.detail is not None and "poisoned row" in r.detail
            assert isinstance(r.__cause__, RuntimeError)
        assert results[1] is not results[3]  # each caller raises its own instance
        assert run.sizes == [6, 3, 1, 1, 1]  # the batch, then each request alone, in order
        assert [n for n, _ in obs.batches] == run.sizes  # every re-run is reported as a batch
        np.testing.assert_array_equal(await b.submit(rows(6)), f(rows(6)))  # still serving
        await b.stop()

    arun(main())


def test_a_split_request_keeps_its_row_order_through_a_re_run() -> None:
    async def main() -> None:
        run = Recorder(poisoned)
        b = await started(run, max_batch_size=4, max_delay_ms=60_000)
        big, bad, small = rows(6), poison(1), rows(1, 50)  # batches [big 0:4], [big 4:6 bad small]
        results = await asyncio.gather(
            b.submit(big), b.submit(bad), b.submit(small), return_exceptions=True
        )
        assert run.sizes == [4, 4, 2, 1, 1]
        np.testing.assert_array_equal(results[0], f(big))
        assert isinstance(results[1], BackendError)
        np.testing.assert_array_equal(results[2], f(small))
        await b.stop()

    arun(main())


def test_a_split_request_failing_in_a_re_run_fails_whole_and_is_not_computed_further() -> None:
    async def main() -> None:
        run = Recorder(poisoned)
        b = await started(run, max_batch_size=4, max_delay_ms=60_000)
        mate, bad, later = rows(2), poison(6), rows(2, 50)  # first batch: [mate, bad 0:2]
        tasks = [asyncio.ensure_future(b.submit(x)) for x in (mate, bad, later)]
        await asyncio.wait(tasks[:2])
        np.testing.assert_array_equal(tasks[0].result(), f(mate))
        with pytest.raises(BackendError) as failed:
            tasks[1].result()
        assert "poisoned row" in str(failed.value.detail)
        assert b.queue_rows == 2  # bad's last four rows are dropped; later waits for mates
        await b.stop()
        np.testing.assert_array_equal(tasks[2].result(), f(later))
        assert run.sizes == [4, 2, 2, 2]

    arun(main())


def test_a_request_cancelled_while_its_batch_fails_is_not_re_run() -> None:
    async def main() -> None:
        run = Recorder(poisoned, hold=True)
        b = await started(run, max_batch_size=4, max_delay_ms=60_000)
        gone, bad = (
            asyncio.ensure_future(b.submit(rows(3))),
            asyncio.ensure_future(b.submit(poison(1))),
        )
        await until(run.entered.is_set)
        gone.cancel()
        await asyncio.sleep(0)
        run.release.set()
        with pytest.raises(BackendError):
            await bad
        assert gone.cancelled() and run.sizes == [4, 1]
        await b.stop()

    arun(main())


def test_a_split_request_failing_midway_is_not_computed_further() -> None:
    def fails_on_large_values(x: Array) -> Array:
        if (x > 200).any():
            raise RuntimeError("boom")
        return f(x)

    async def main() -> None:
        run = Recorder(fails_on_large_values)
        b = await started(run, max_batch_size=10, max_delay_ms=0)
        with pytest.raises(BackendError) as failed:
            await b.submit(rows(100))  # values pass 200 in the 7th chunk of 10 rows
        assert "boom" in str(failed.value.detail)
        assert len(run.batches) == 7 and b.queue_rows == 0
        await b.stop()

    arun(main())


@pytest.mark.parametrize(
    "bad",
    [lambda x: f(x)[:-1], lambda x: np.concatenate([f(x), f(x)]), lambda x: 3.0, lambda x: None],
    ids=["fewer-rows", "more-rows", "scalar", "none"],
)
def test_wrong_output_row_count_fails_each_request(bad: Callable[[Array], Any]) -> None:
    async def main() -> None:
        good = {"on": False}
        run = Recorder(lambda x: f(x) if good["on"] else bad(x))
        b = await started(run, max_delay_ms=20)
        results = await asyncio.gather(b.submit(rows(2)), b.submit(rows(3)), return_exceptions=True)
        assert all(isinstance(r, BackendError) for r in results), results
        assert "input rows" in str(results[0])
        assert run.sizes == [5, 2, 3]  # wrong alone too: each request fails on its own rows
        good["on"] = True
        np.testing.assert_array_equal(await b.submit(rows(2)), f(rows(2)))
        await b.stop()

    arun(main())


def test_a_backend_wrong_only_on_batches_still_answers_single_rows_via_re_runs() -> None:
    # A backend that drops a row whenever it sees more than one is a broken backend, but the
    # re-run alone is the same contract check: each request gets correct rows or BackendError for
    # its own rows. Single-row requests are all answered correctly (at one run each); a multi-row
    # request fails, since its rows alone still come back wrong. No output row is ever guessed.
    def wrong_on_batches(x: Array) -> Array:
        return f(x) if len(x) == 1 else f(x)[:-1]

    async def main() -> None:
        run = Recorder(wrong_on_batches)
        b = await started(run, max_batch_size=5, max_delay_ms=60_000)
        xs = [rows(1, 10 * i) for i in range(3)] + [rows(2, 50)]
        results = await asyncio.gather(*(b.submit(x) for x in xs), return_exceptions=True)
        for x, out in zip(xs[:3], results[:3], strict=True):
            np.testing.assert_array_equal(out, f(x))
        assert isinstance(results[3], BackendError) and "for 2 input rows" in results[3].message
        assert run.sizes == [5, 1, 1, 1, 2]
        await b.stop()

    arun(main())


@pytest.mark.parametrize("timeout_s", [None, 30.0])
def test_stop_drains_every_accepted_request_then_refuses(timeout_s: float | None) -> None:
    async def main() -> None:
        run = Recorder(hold=True)
        b = await started(run, max_batch_size=8, max_delay_ms=60_000)
        first = asyncio.ensure_future(b.submit(rows(8)))
        await until(run.entered.is_set)
        xs = [rows(3, 100 * i) for i in range(7)]
        tasks = [asyncio.ensure_future(b.submit(x)) for x in xs]
        await until(lambda: b.queue_rows == 21)
        stopping = asyncio.ensure_future(b.stop(timeout_s))
        await asyncio.sleep(0.01)
        with pytest.raises(ModelNotReady):
            await b.submit(rows(1))
        t0 = time.monotonic()
        run.release.set()
        await stopping
        assert time.monotonic() - t0 < 2.0  # the drain does not wait out the 60 s deadline
        assert run.sizes == [8, 8, 8, 5]
        await first
        for x, t in zip(xs, tasks, strict=True):
            np.testing.assert_array_equal(t.result(), f(x))

    arun(main())


def test_stop_with_a_timeout_fails_what_a_stuck_backend_never_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = Recorder(hold=True)  # the first batch never returns until the test ends

    async def main() -> None:
        b = await started(run, max_batch_size=4, max_delay_ms=0)
        split = asyncio.ensure_future(b.submit(rows(6)))  # rows 0:4 run and stick, 4:6 queue
        await until(run.entered.is_set)
        queued = [asyncio.ensure_future(b.submit(rows(3, 100 * i))) for i in range(3)]
        await until(lambda: b.queue_rows == 11)
        t0 = time.monotonic()
        await b.stop(timeout_s=0.1)
        assert 0.09 <= time.monotonic() - t0 < 2.0
        for t in [split, *queued]:
            assert t.done() and isinstance(t.exception(), ModelNotReady)
        assert "stopped before this request ran" in str(queued[0].exception())
        assert b.queue_rows == 0 and run.sizes == [4]
        with pytest.raises(ModelNotReady):
            await b.submit(rows(1))

    try:
        arun(main())
    finally:
        run.release.set()  # let the worker thread finish; its late result is dropped
    assert "failed 4 unanswered requests" in caplog.text  # the split request counts once


def test_cancelling_stop_ends_the_drain_and_fails_what_was_waiting() -> None:
    run = Recorder(hold=True)

    async def main() -> None:
        b = await started(run, max_batch_size=4, max_delay_ms=0)
        tasks = [asyncio.ensure_future(b.submit(rows(3, 100 * i))) for i in range(3)]
        await until(lambda: run.entered.is_set() and b.queue_rows == 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.stop(), timeout=0.05)
        await asyncio.wait(tasks)
        assert all(isinstance(t.exception(), ModelNotReady) for t in tasks)

    try:
        arun(main())
    finally:
        run.release.set()


def test_stop_rejects_a_negative_timeout() -> None:
    async def main() -> None:
        b = await started(Recorder())
        with pytest.raises(ConfigError, match="timeout_s=-1"):
            await b.stop(timeout_s=-1)
        await b.stop()

    arun(main())


def test_submit_before_start_is_refused() -> None:
    async def main() -> None:
        b = Batcher(
            f,
            max_batch_size=4,
            max_delay_ms=0,
        )
        with pytest.raises(ModelNotReady):
            await b.submit(rows(1))
        await b.stop()

    arun(main())


def test_cancelled_request_leaves_the_queue_and_is_never_computed() -> None:
    async def main() -> None:
        run = Recorder(hold=True)
        b = await started(run, max_batch_size=4, max_delay_ms=0)
        first = asyncio.ensure_future(b.submit(rows(2)))
        await until(run.entered.is_set)
        gone = asyncio.ensure_future(b.submit(rows(3, -1000)))
        kept = asyncio.ensure_future(b.submit(rows(1, 7)))
        await until(lambda: b.queue_rows == 4)
        gone.cancel()
        await asyncio.sleep(0)
        assert b.queue_rows == 1
        run.release.set()
        await asyncio.gather(first, kept)
        assert gone.cancelled()
        assert not any((batch < 0).any() for batch in run.batches)
        assert run.sizes == [2, 1]
        await b.stop()

    arun(main())


def test_wait_for_timeout_keeps_the_batcher_consistent() -> None:
    async def main() -> None:
        run = Recorder(hold=True)
        b = await started(run, max_batch_size=64, max_delay_ms=0)
        first = asyncio.ensure_future(b.submit(rows(2)))
        await until(run.entered.is_set)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.submit(rows(150, -1000)), timeout=0.05)  # queued, split
        assert b.queue_rows == 0
        run.release.set()
        await first
        np.testing.assert_array_equal(await b.submit(rows(70)), f(rows(70)))
        assert run.sizes == [2, 64, 6]
        await b.stop()

    arun(main())


def test_cancel_while_running_discards_only_that_result() -> None:
    async def main() -> None:
        run = Recorder(hold=True)
        b = await started(run, max_delay_ms=20)
        a, c = asyncio.ensure_future(b.submit(rows(2))), asyncio.ensure_future(b.submit(rows(3)))
        await until(run.entered.is_set)
        a.cancel()
        await asyncio.sleep(0)
        run.release.set()
        np.testing.assert_array_equal(await c, f(rows(3)))
        assert a.cancelled() and run.sizes == [5]
        await b.stop()

    arun(main())


def test_adaptive_delay_skips_the_wait_when_nothing_overlaps() -> None:
    async def main() -> None:
        run = Recorder()
        b = await started(run, max_delay_ms=300, adaptive_delay=True)
        for i in range(3):  # concurrency 1: no request ever waits for mates that never come
            _, took = await timed(b.submit(rows(1, i)))
            assert took < 0.25
        outs = await asyncio.gather(*(b.submit(rows(1, i)) for i in range(6)))
        assert len(outs) == 6 and run.sizes[3:] in ([1, 5], [6])  # overlap still merges
        await b.stop()

    arun(main())


def test_statistics_see_batches_waits_and_queue_depth() -> None:
    async def main() -> None:
        obs = Obs()
        b = await started(Recorder(), max_batch_size=4, max_delay_ms=0, stats=obs)
        await b.submit(rows(6))
        assert [r for r, _ in obs.batches] == [4, 2] and all(s >= 0 for _, s in obs.batches)
        assert obs.depths[0] == 6 and obs.depths[-1] == 0
        assert len(obs.waits) == 1  # one request: one wait, up to its first batch
        await b.stop()

    arun(main())


@pytest.mark.parametrize(
    "kw",
    [{"max_batch_size": 0}, {"max_delay_ms": -1.0}, {"timeout_s": 0}],
)
def test_bad_configuration_names_the_value(kw: dict[str, Any]) -> None:
    opts: dict[str, Any] = {"max_batch_size": 4, "max_delay_ms": 1.0}
    with pytest.raises(ConfigError, match=next(iter(kw))):
        Batcher(f, **(opts | kw))


def test_empty_request_is_invalid() -> None:
    async def main() -> None:
        b = await started(Recorder())
        with pytest.raises(InvalidInput, match="no rows"):
            await b.submit(rows(0))
        await b.stop()

    arun(main())


def test_inline_mode_runs_on_the_loop_thread_and_keeps_every_guarantee() -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        threads: list[int] = []

        def on_loop(x: Array) -> Array:
            threads.append(threading.get_ident())
            return poisoned(x)

        b = await started(on_loop, max_batch_size=6, max_delay_ms=60_000, inline=True)
        xs = [rows(3), poison(1), rows(1, 50), rows(7, 7)]  # 12 rows: two full batches, one split
        results = await asyncio.gather(*(b.submit(x) for x in xs), return_exceptions=True)
        np.testing.assert_array_equal(results[0], f(xs[0]))
        assert isinstance(results[1], BackendError)
        np.testing.assert_array_equal(results[2], f(xs[2]))
        np.testing.assert_array_equal(results[3], f(xs[3]))
        assert set(threads) == {loop_thread}
        await b.stop()

    arun(main())


def test_adaptive_delay_stops_waiting_once_arrivals_pause() -> None:
    async def main() -> None:
        run = Recorder()
        # delay 1 s, so the pause rule (an eighth: 125 ms without a new request) decides.
        b = await started(run, max_batch_size=64, max_delay_ms=1000, adaptive_delay=True)
        pair, elapsed = await timed(asyncio.gather(b.submit(rows(1)), b.submit(rows(1, 9))))
        np.testing.assert_array_equal(pair[1], f(rows(1, 9)))
        assert 0.1 <= elapsed < 0.9  # went after the pause, not after the full delay

        async def later(delay_s: float, x: Array) -> Array:
            await asyncio.sleep(delay_s)
            return await b.submit(x)

        # A trickle 40 ms apart keeps the batch open: all five share one run.
        xs = [rows(1, 100 * i) for i in range(5)]
        results = await asyncio.gather(*(later(0.04 * i, x) for i, x in enumerate(xs)))
        for x, r in zip(xs, results, strict=True):
            np.testing.assert_array_equal(r, f(x))
        assert run.sizes == [2, 5]
        await b.stop()

    arun(main())


def test_inline_mode_yields_to_the_loop_between_batches() -> None:
    async def main() -> None:
        b = await started(f, max_batch_size=1, max_delay_ms=0, inline=True)
        done = False
        ticks_during = 0

        async def ticker() -> None:
            nonlocal ticks_during
            while not done:
                ticks_during += 1
                await asyncio.sleep(0)

        task = asyncio.get_running_loop().create_task(ticker())
        big = rows(200)  # 200 inline runs of one row each
        np.testing.assert_array_equal(await b.submit(big), f(big))
        done = True
        await task
        assert ticks_during > 50  # the ticker ran between the runs, not only before and after
        await b.stop()

    arun(main())


def burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU (a slow model, unlike a sleep or a preemption)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_an_inline_model_that_turns_slow_moves_to_a_thread_and_comes_back_when_fast(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        threads: list[int] = []
        slow_runs = 5

        def turns_fast(x: Array) -> Array:
            threads.append(threading.get_ident())
            if len(threads) <= slow_runs:
                burn(0.01)  # 10 ms of CPU, five times the inline limit below
            return f(x)

        b = await started(turns_fast, max_delay_ms=0, inline=True, inline_limit_ms=2.0)
        for i in range(5):
            np.testing.assert_array_equal(await b.submit(rows(2, i)), f(rows(2, i)))
        # Three slow runs in a row measured in CPU time (the first is only seen slow in wall
        # time, which may be a preemption), then it moves.
        assert threads[:4] == [loop_thread] * 4
        assert threads[4] != loop_thread and not b.inline
        # Fast again: after enough fast runs in the thread, back on the loop.
        for i in range(batching._FAST_RUNS_TO_RETURN + 5):
            await b.submit(rows(1, i))
        assert b.inline and threads[-1] == loop_thread
        assert threads.index(loop_thread, 4) == slow_runs + batching._FAST_RUNS_TO_RETURN
        await b.stop()

    with caplog.at_level("INFO", logger="service.batching"):
        arun(main())
    assert "running this model in a worker thread" in caplog.text
    assert "inline on the event loop again" in caplog.text


def preempted(run: int) -> None:
    time.sleep(0.03)  # 30 ms of wall time against a 10 ms limit, almost no CPU


def every_other_run_slow(run: int) -> None:
    if run % 2:
        burn(0.03)  # slow in CPU, but never twice in a row


@pytest.mark.parametrize("pause", [preempted, every_other_run_slow])
def test_runs_that_are_not_three_slow_in_cpu_in_a_row_keep_the_model_on_the_loop(
    pause: Callable[[int], None],
) -> None:
    """Preempted runs on a busy machine (or a profiler's pause) take long without costing the
    loop's thread anything, and one slow run among fast ones says nothing about the model:
    neither moves it off the loop."""

    async def main() -> None:
        loop_thread = threading.get_ident()
        threads: list[int] = []

        def run(x: Array) -> Array:
            threads.append(threading.get_ident())
            pause(len(threads))
            return f(x)

        b = await started(run, max_delay_ms=0, inline=True, inline_limit_ms=10.0)
        for i in range(6):
            await b.submit(rows(2, i))
        assert threads == [loop_thread] * 6 and b.inline
        await b.stop()

    arun(main())


def test_a_full_batch_never_overtakes_queued_rows() -> None:
    async def main() -> None:
        run = Recorder()
        b = await started(run, max_batch_size=4, max_delay_ms=200, inline=True)
        one, full = rows(1, 500), rows(4)
        first = asyncio.ensure_future(b.submit(one))
        await asyncio.sleep(0)  # queued, waiting for batch mates
        results = await asyncio.gather(b.submit(full), first)
        np.testing.assert_array_equal(results[0], f(full))
        np.testing.assert_array_equal(results[1], f(one))
        assert run.sizes == [4, 1]  # the queued row first, with three of the full request's
        np.testing.assert_array_equal(run.batches[0][0], one[0])
        await b.stop()

    arun(main())


def test_a_request_past_its_timeout_fails_and_its_rows_are_never_run() -> None:
    async def main() -> None:
        run = Recorder()
        b = await started(run, max_batch_size=8, max_delay_ms=60_000, timeout_s=0.05)
        with pytest.raises(InferenceTimeout, match=r"no result within 0\.05 s"):
            await b.submit(rows(3))  # waits for batch mates that never come
        assert b.queue_rows == 0
        np.testing.assert_array_equal(await b.submit(rows(8, 1)), f(rows(8, 1)))
        assert run.sizes == [8]
        await b.stop()

    arun(main())


def test_a_lone_request_runs_in_its_own_task_and_concurrent_ones_still_share_batches() -> None:
    """An idle inline batcher runs a lone request at once in the caller's task (no hand-over to
    the batch task); requests arriving together still leave as one batch."""

    async def main() -> None:
        tasks: list[asyncio.Task[Any] | None] = []

        def run(x: Array) -> Array:
            tasks.append(asyncio.current_task())
            return f(x)

        recorder = Recorder(run)
        b = await started(
            recorder, max_batch_size=8, max_delay_ms=50, inline=True, adaptive_delay=True
        )
        out = await b.submit(rows(1))
        np.testing.assert_array_equal(out, f(rows(1)))
        assert tasks == [asyncio.current_task()]  # run right here, in this task
        together = [rows(1, 10 * i) for i in range(4)]
        results = await asyncio.gather(*(b.submit(x) for x in together))
        for x, result in zip(together, results, strict=True):
            np.testing.assert_array_equal(result, f(x))
        # The first of them ran alone at once; the three behind it waited for one batch.
        assert recorder.sizes == [1, 1, 3]
        await b.stop()

    arun(main())


def test_a_wait_shorter_than_the_clocks_step_does_not_spin_the_loop() -> None:
    """uvloop's clock and timers move in whole milliseconds: a batch wait of 0.25 ms used to
    wake the batch task again and again until the clock ticked. A wait shorter than a step is
    not waited."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        b = await started(Recorder(), max_batch_size=64, max_delay_ms=2.0, adaptive_delay=True)
        turns = 0
        real = loop.call_at

        def counted(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            nonlocal turns
            turns += 1
            return real(when, callback, *args)

        loop.call_at = counted  # type: ignore[method-assign]
        try:
            await asyncio.gather(*(b.submit(rows(1, i)) for i in range(8)))
        finally:
            loop.call_at = real  # type: ignore[method-assign]
        assert turns <= 2  # at most a real wait or two, never a timer per turn of the loop
        await b.stop()

    uvloop_run = _uvloop_runner()
    uvloop_run(main())


def _uvloop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop

        return uvloop.run
    except ImportError:  # the test is about uvloop's clock; asyncio's is fine-grained
        return asyncio.run


def test_a_request_that_fills_a_batch_runs_at_once_even_without_adaptive_delay() -> None:
    """A request of exactly the cap in rows can have no batch mates: an idle inline batcher runs
    it in the caller's task (``try_now``), without waiting out the delay."""

    async def main() -> None:
        run = Recorder()
        b = await started(run, max_batch_size=4, max_delay_ms=60_000, inline=True)
        full = rows(4)
        out = b.try_now(full)  # no coroutine, no wait: the delay of a minute is not waited
        assert out is not None
        np.testing.assert_array_equal(out, f(full))
        again = b.try_now(rows(4, 1))  # another in the same turn: no mates to wait for either
        assert again is not None
        np.testing.assert_array_equal(again, f(rows(4, 1)))
        assert b.try_now(rows(1)) is None  # a partial batch waits for mates: submit it
        assert b.try_now(rows(5)) is None  # more than the cap: split by the batch task
        assert run.sizes == [4, 4]
        await b.stop()

    arun(main())


def test_one_watchdog_times_requests_out_whatever_order_their_deadlines_come_in() -> None:
    """No timer per request: one watchdog, set for the earliest time a request may expire. A
    later request with an earlier deadline still fails on time; the others wait on."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        run = Recorder()
        b = await started(run, max_batch_size=64, max_delay_ms=60_000, timeout_s=30)
        timers = 0
        real = loop.call_at

        def counted(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            nonlocal timers
            timers += 1
            return real(when, callback, *args)

        loop.call_at = counted  # type: ignore[method-assign]
        try:
            patient = [asyncio.ensure_future(b.submit(rows(1, i))) for i in range(20)]
            await asyncio.sleep(0)
            assert timers == 1  # the first request's expiry; the others' are later
            hasty = asyncio.ensure_future(b.submit(rows(1, 99), loop.time() + 0.05))
            t0 = time.monotonic()
            with pytest.raises(InferenceTimeout, match="own deadline"):
                await hasty
            assert time.monotonic() - t0 < 1.0
            assert not any(p.done() for p in patient)
        finally:
            loop.call_at = real  # type: ignore[method-assign]
        await b.stop()  # answers the patient ones
        for i, p in enumerate(patient):
            np.testing.assert_array_equal(p.result(), f(rows(1, i)))
        assert 99 not in np.concatenate(run.batches)[:, 0]  # the hasty row was never computed

    arun(main())


def test_outputs_that_overflow_fail_their_own_request_alone_naming_its_samples() -> None:
    """Outputs are checked once per batch; a request whose rows came back NaN or infinite fails
    with InvalidInput naming its own sample numbers (a split request's too), the others of the
    batch get theirs."""

    def overflowing(x: Array) -> Array:
        out = f(x)
        out[x[:, 0] >= 1000] = np.inf  # rows starting at 1000 or more overflow
        return out

    async def main() -> None:
        b = await started(Recorder(overflowing), max_batch_size=4, max_delay_ms=50)
        fine, bad = rows(2), np.concatenate([rows(1), rows(1, 1000)])
        split = np.concatenate([rows(4, 10), rows(2, 2000)])  # rows 4 and 5 overflow
        results = await asyncio.gather(
            b.submit(fine), b.submit(bad), b.submit(split), return_exceptions=True
        )
        np.testing.assert_array_equal(results[0], f(fine))
        assert isinstance(results[1], InvalidInput)
        assert "not finite (NaN or infinity) for sample 1;" in results[1].message
        assert isinstance(results[2], InvalidInput)
        assert "for samples 4, 5;" in results[2].message
        await b.stop()

    arun(main())
