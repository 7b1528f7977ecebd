"""Dynamic batching for one model version: numpy rows in, numpy rows out, no protocol.

Requests queue FIFO; a batch leaves when it holds ``max_batch_size`` rows or when the oldest
waiting request has waited ``max_delay_ms``. What enters was admitted (service.admission): the
batcher never refuses for room or time. Requests larger than the cap are split into chunks
that may share batches with their neighbours and are reassembled in order. A batch that fails
is re-run one request at a time, so a request only ever fails for its own rows; so do outputs
that are not finite (a finite input can overflow inside a model): a request whose rows gave NaN
or infinity fails with InvalidInput, its batch mates get theirs. A request not answered within
``timeout_s`` (or by its own earlier deadline) fails with a timeout and its queued rows are
dropped. ``estimated_wait`` tells, from the queue and the measured batch times,
how long a new request would wait: the dataplane refuses work that would be answered too late.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.backends import Array
from service.errors import (
    BackendError,
    ConfigError,
    FoldserveError,
    InferenceTimeout,
    InvalidInput,
    ModelNotReady,
)
from service.finite import all_finite, check_finite_outputs

log = logging.getLogger(__name__)


class BatchStats(Protocol):
    """Where the batcher counts (service.telemetry.VersionFigures): plain arithmetic on the
    event loop, read at scrape time."""

    def waited(self, seconds: float) -> None: ...

    def ran(self, requests: int, rows: int, seconds: float) -> None: ...

    def gauge(self, queue_rows: int, estimated_wait_s: float) -> None: ...


@dataclass(eq=False)  # identity equality: deque.remove must find this request, not an equal one
class _Request:
    rows: Array
    future: asyncio.Future[Array]
    arrived: float  # loop.time() at submit; the batch deadline is counted from the oldest
    queued_at: float = 0.0  # perf_counter() at submit, for the statistics' queue time
    expires: float = math.inf  # loop.time() past which it fails with a timeout
    own_deadline: bool = False  # ``expires`` is the request's own deadline, not timeout_s
    taken: int = 0  # rows already handed to a batch; the rest are still queued
    chunks: dict[int, Array] | None = None  # a split request's outputs so far, by first row
    answered: int = 0  # rows of a split request whose outputs are in ``chunks``


_Part = tuple[_Request, int, int]  # rows [start, stop) of one request inside a batch
_FAST_RUNS_TO_RETURN = 100  # in a row, each under half the inline limit
_SLOW_RUNS_TO_LEAVE_THE_LOOP = 3
_TIMER_STEP_S = 0.001  # the resolution of the loop's clock and timers (uvloop: 1 ms)
# NOTE: weight of the newest batch in the batch-time average: about the last ten batches count,
# so the estimate follows a change of load within milliseconds but one preempted run moves it
# by a fifth only.
_BATCH_TIME_WEIGHT = 0.2


@dataclass(frozen=True)
class _Failed:
    """A run that raised or returned the wrong rows; returned, not raised, so callers pick whom."""

    message: str
    cause: Exception | None = None


def _failure(exc: Exception) -> str:
    """What the requests of a failed run are told: the runtime's own message may name server
    paths or its internals, so only our errors' (client-safe) messages are passed on."""
    if isinstance(exc, FoldserveError):
        return f"inference failed: {exc.message}"
    return "inference failed in the model's runtime: see the server log"


def _detail(cause: Exception | None) -> str | None:
    """The failure as the log shows it."""
    if cause is None:
        return None
    return (
        cause.logged() if isinstance(cause, FoldserveError) else f"{type(cause).__name__}: {cause}"
    )


def _checked(out: object, rows: int) -> Array | _Failed:
    if not isinstance(out, np.ndarray) or out.ndim == 0 or len(out) != rows:
        got = getattr(out, "shape", type(out).__name__)
        # Never guess which output row belongs to whom.
        return _Failed(f"backend returned {got} for {rows} input rows")
    return out


class Batcher:
    def __init__(
        self,
        run: Callable[[Array], Array],
        *,
        max_batch_size: int,
        max_delay_ms: float,
        executor: concurrent.futures.Executor | None = None,
        adaptive_delay: bool = False,
        inline: bool = False,
        inline_limit_ms: float = 2.0,
        timeout_s: float | None = None,
        initial_batch_s: float = 0.0,
        stats: BatchStats | None = None,
        parallel_run: Callable[[Array], Array] | None = None,
        parallel_runs: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size={max_batch_size}: must be at least 1")
        if max_delay_ms < 0:
            raise ConfigError(f"max_delay_ms={max_delay_ms}: must be 0 (no wait) or more")
        if parallel_runs < 1 or (parallel_runs > 1 and parallel_run is None):
            raise ConfigError(f"parallel_runs={parallel_runs}: must be 1, or more with a run")
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigError(f"timeout_s={timeout_s}: must be None (no limit) or more than 0")
        self._run = run
        self._cap = max_batch_size
        self._delay_s = max_delay_ms / 1000.0
        # NOTE: one worker thread by default: the loop never blocks on inference, and one model
        # version never runs two batches at once (the loop awaits each run before the next).
        self._parallel_run = parallel_run if parallel_runs > 1 else None
        self._parallel_runs = parallel_runs
        # NOTE: parallel runs get threads of their own: a run on every thread keeps the one
        # worker it always had (handing it to whichever of two idle workers cost a served UNet
        # at one connection a fifth of its images per second, measured).
        self._narrow_executor = (
            concurrent.futures.ThreadPoolExecutor(
                max_workers=parallel_runs, thread_name_prefix="foldserve-run"
            )
            if self._parallel_run is not None
            else None
        )
        self._narrow_running = 0  # one-thread runs in flight (parallel runs only)
        self._runs: set[asyncio.Task[None]] = set()  # parallel runs' tasks, for stop()
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="foldserve-batch"
        )
        self._stats = stats  # each request's wait, each run's rows and time
        self._adaptive = adaptive_delay
        # NOTE: inline runs the model on the event loop itself. For a model that answers in tens
        # of microseconds the hop to a worker thread (~100 us, and a second thread fighting for
        # the GIL) costs more than the inference; the caller decides from a measured batch time.
        self._inline = inline
        self._may_inline = inline  # a model moved to a thread comes back once its runs are fast
        self._inline_limit_s = inline_limit_ms / 1000.0
        self._slow_inline_runs = 0  # in a row; a few in a row, not one, move the model to a thread
        self._slow_wall = False  # the last inline run took longer than the limit in wall time
        self._fast_thread_runs = 0  # in a row, in the thread; many bring it back to the loop
        self._timeout_s = timeout_s
        self._queue: deque[_Request] = deque()
        self._queue_rows = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The batches in the executor (several with parallel runs): stop() may have to fail them.
        self._running: list[_Part] = []
        self._stopping = False
        self._last_alone = True  # adaptive mode: did the previous batch hold a single request?
        self._ran_now = False  # a lone request ran in its own task in this turn of the loop
        self._last_done = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None  # once started
        self._watchdog: asyncio.TimerHandle | None = None  # see ``_watch``
        self._watch_at = math.inf
        # Seconds per backend call, averaged; starts from a time measured at load, if any.
        self._batch_s = max(0.0, initial_batch_s)
        self._row_s = 0.0  # seconds per row of the runs together, averaged (parallel runs)

    @property
    def inline(self) -> bool:
        """Whether batches run on the event loop now (a slow run moves them to a thread)."""
        return self._inline

    @property
    def queue_rows(self) -> int:
        return self._queue_rows

    @property
    def batch_seconds(self) -> float:
        """The average time of one backend call lately (0 until one is measured)."""
        return self._batch_s

    def estimated_wait(self, rows: int) -> float:
        """Seconds until a request of ``rows`` rows submitted now has its answer, estimated.

        The batches ahead of it and its own, each at the average batch time, plus half a batch
        for a run in progress. Exact when batches run full, as they do under load; at low load
        it overstates a little (partial batches are faster), which only matters near a deadline.
        """
        running = 0.5 if self._running else 0.0
        if self._parallel_run is not None and self._row_s > 0.0:
            # NOTE: with parallel runs a batch is a share of the queue, not a full cap, so the
            # rows ahead count, at the rate the runs together go through them.
            return (self._queue_rows + rows) * self._row_s + running * self._batch_s
        batches = -(-(self._queue_rows + rows) // self._cap)
        return (batches + running) * self._batch_s

    async def start(self) -> None:
        if self._task is None:
            # NOTE: kept, not looked up per request: on Python 3.11 asyncio.get_running_loop()
            # makes a getpid() system call every time (a fork check).
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._serve())

    def now(self) -> float:
        """The event loop's clock (deadlines are counted on it); once started."""
        assert self._loop is not None, "Batcher.now before start"
        return self._loop.time()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Refuse new requests, answer every accepted one, then release the owned executor.

        ``timeout_s`` bounds the drain (None waits for ever): a drain still going after it, say
        behind a stuck inference, is cut short and every unanswered request gets ModelNotReady.
        """
        if timeout_s is not None and timeout_s < 0:
            raise ConfigError(f"timeout_s={timeout_s}: must be None (wait for ever) or 0 or more")
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                done, _ = await asyncio.wait([task], timeout=timeout_s)
            except asyncio.CancelledError:
                task.cancel()  # whoever cancelled stop() gave up on the drain: end it, as before
                raise
            if done:
                task.result()  # a serving task that died re-raises here, as before
            else:
                await self._abandon(task, timeout_s)
        if self._watchdog is not None:  # every request is answered or failed by now
            self._watchdog.cancel()
            self._watchdog, self._watch_at = None, math.inf
        if self._owns_executor:
            self._executor.shutdown(wait=False)
        if self._narrow_executor is not None:
            self._narrow_executor.shutdown(wait=False)

    async def _abandon(self, task: asyncio.Task[None], timeout_s: float | None) -> None:
        """Cancel a drain that overran; no accepted request is left waiting."""
        running = [req for req, _, _ in self._running]
        # A set: a split request can be both running and queued. (_Request hashes by identity.)
        stranded = len({req for req in [*running, *self._queue] if not req.future.done()})
        task.cancel()
        await asyncio.wait([task])  # its handlers fail the running batch, then the queue
        # NOTE: a task cancelled before its first step never enters _serve, so no handler ran.
        self._fail_queue()
        # The stuck call keeps its worker thread until it returns; its result is then dropped.
        log.warning(
            "batcher drain overran stop(timeout_s=%s): failed %d unanswered requests",
            timeout_s,
            stranded,
        )

    def try_now(self, rows: Array) -> Array | None:
        """The outputs for ``rows`` at once, when they would run as a batch of their own right
        away anyway (``_alone_now``); None otherwise: ``submit`` them. (What ``submit`` does
        first, without the coroutine: a small model's request costs a few microseconds.)"""
        loop = self._loop
        if loop is None or not len(rows) or not self._alone_now(len(rows)):
            return None
        return self._run_now(rows, loop, time.perf_counter())

    async def submit(self, rows: Array, deadline: float | None = None) -> Array:
        """The model's outputs for ``rows``. ``deadline`` (the loop's clock) ends the wait earlier
        than ``timeout_s``: past it the request fails with a timeout and is never computed."""
        loop = self._loop
        if self._stopping or loop is None:
            raise ModelNotReady("model version is not serving (stopping or not started)")
        n = len(rows)
        if n == 0:
            raise InvalidInput("request has no rows: send at least one")
        if self._alone_now(n):
            return self._run_now(rows, loop, time.perf_counter())
        # NOTE: perf_counter, not loop.time(): uvloop's clock moves in milliseconds.
        req = _Request(rows, loop.create_future(), loop.time(), time.perf_counter())
        if self._timeout_s is not None:
            req.expires = req.arrived + self._timeout_s
        if deadline is not None and deadline < req.expires:
            req.expires, req.own_deadline = deadline, True
        was_empty = not self._queue
        self._queue.append(req)
        self._queue_rows += n
        if was_empty or self._queue_rows >= self._cap:
            self._wake.set()  # only these change what the loop waits for; skip needless wake-ups
        self._report_queue()
        if req.expires < self._watch_at:
            self._watch(loop, req.expires)
        try:
            return await req.future
        except asyncio.CancelledError:
            # Client gone: never compute its queued rows.
            self._discard(req)
            self._wake.set()  # the oldest request may have changed: recompute the deadline
            raise

    def _watch(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Have the watchdog look at the requests by ``when`` (the loop's clock).

        NOTE: one timer for all of a batcher's requests, set for the earliest time one of them
        may expire, not one per request: a loop timer made and cancelled for every request cost
        3% of a one-sample request's CPU. Requests are answered long before they expire; the
        watchdog wakes at most when the oldest one might have, and looks again then.
        """
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watch_at = when
        self._watchdog = loop.call_at(when, self._look, loop)

    def _look(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the requests past their time (queued or running); watch for the next one."""
        self._watchdog, self._watch_at = None, math.inf
        now = loop.time()
        earliest = math.inf
        for req in [*self._queue, *(req for req, _, _ in self._running)]:
            if req.future.done():
                continue
            if req.expires <= now:
                self._expire(req, req.own_deadline)
            else:
                earliest = min(earliest, req.expires)
        if earliest < math.inf:
            # A timer may fire a clock step early: never look again sooner than a step later.
            self._watch(loop, max(earliest, now + _TIMER_STEP_S))

    def _alone_now(self, rows: int) -> bool:
        """Whether this request would be a batch of its own, run at once: an inline model,
        nothing queued or running, and either it fills a batch by itself or (adaptive delay)
        no batch mates were seen lately, so the batch task would not wait for any."""
        # NOTE: of the partial batches arriving in one turn of the loop only the first runs at
        # once (``_ran_now``): the rest queue behind it and leave together. A full one never
        # has mates to wait for.
        return (
            self._inline
            and not self._queue
            and not self._running
            and not self._stopping
            and (
                rows == self._cap
                or (rows < self._cap and self._adaptive and self._last_alone and not self._ran_now)
            )
        )

    def _run_now(self, rows: Array, loop: asyncio.AbstractEventLoop, submitted: float) -> Array:
        """Run a lone request in the caller's task: exactly what the batch task would do with
        it (one inline run, the same checks and figures), without the hand-over to that task
        and back, which cost more than a small model's run (issue 17: ~150 us per batch)."""
        if self._stats is not None:
            self._stats.waited(time.perf_counter() - submitted)  # no queue: next to nothing
        # NOTE: requests read in the same turn of the loop (a burst from many connections)
        # arrive one after the other in it: only the first runs alone; the rest queue behind
        # it and leave as one batch, as before.
        self._ran_now = True
        loop.call_soon(self._new_turn)
        outcome = self._infer_inline(rows, 1)
        self._last_done = loop.time()
        self._last_alone = True
        self._report_queue()  # the batch time moved: so did a new row's estimated wait
        if isinstance(outcome, _Failed):
            error = BackendError(outcome.message, detail=_detail(outcome.cause))
            error.__cause__ = outcome.cause
            raise error
        check_finite_outputs(outcome)
        return outcome

    def _new_turn(self) -> None:
        self._ran_now = False

    def _expire(self, req: _Request, own_deadline: bool = False) -> None:
        if req.future.done():
            return
        message = (
            "no result within the request's own deadline (its time budget, at most "
            f"{self._timeout_s:g} s: request_timeout_s)"
            if own_deadline and self._timeout_s is not None
            else "no result within the request's own deadline"
            if own_deadline
            else f"no result within {self._timeout_s:g} s (request_timeout_s)"
        )
        req.future.set_exception(InferenceTimeout(message))
        self._discard(req)  # its rows still queued are never computed
        self._wake.set()

    def _discard(self, req: _Request) -> None:
        if req.taken < len(req.rows):
            self._queue.remove(req)
            self._queue_rows -= len(req.rows) - req.taken
            req.taken = len(req.rows)
            self._report_queue()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    if self._stopping:
                        if self._runs:  # a drain answers what is running too
                            await asyncio.wait(set(self._runs))
                            continue
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if self._parallel_run is not None and not self._inline:
                    await self._launch_parallel(loop)
                    continue
                await self._wait_for_batch(loop)
                if self._queue:
                    await self._run_batch(loop, self._take())
                    if self._inline and self._queue:
                        # NOTE: an inline run never awaits; without this yield a deep queue runs
                        # batch after batch while no other request (or timeout) gets a turn.
                        # (An empty queue yields below, waiting for the next request.)
                        await asyncio.sleep(0)
        finally:
            # Reached on stop (queue empty) or if this task dies: fail the rest, never hang them.
            if self._runs:
                await self._end_runs()
            self._fail_queue()

    def _fail_queue(self) -> None:
        for req in self._queue:
            req.taken = len(req.rows)  # out of the queue: a later cancel has nothing to remove
            if not req.future.done():
                req.future.set_exception(ModelNotReady("batcher stopped before this request ran"))
        self._queue.clear()
        self._queue_rows = 0

    async def _wait_for_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        # NOTE: trade-off. Waiting for batch mates while the backend sits idle costs a lone request
        # up to max_delay_ms (the whole tax at concurrency 1) but lets concurrent requests share one
        # run. We wait by default, as configured. With adaptive_delay we skip the wait when the last
        # batch was a single request and this one arrived after it finished: no overlap seen, so
        # waiting most likely buys nothing. Overlap (two requests in one batch) restores the wait.
        # Adaptive mode also stops waiting once no request has arrived for an eighth of the delay:
        # closed-loop clients send their next requests in one burst after their answers, so with
        # fewer clients than the cap the batch would otherwise always wait out the full delay.
        while self._queue and self._queue_rows < self._cap and not self._stopping:
            head = self._queue[0]
            if (
                self._adaptive
                and self._last_alone
                and len(self._queue) == 1
                and head.arrived >= self._last_done
            ):
                return
            deadline = head.arrived + self._delay_s
            if self._adaptive:
                deadline = min(deadline, self._queue[-1].arrived + self._delay_s / 8)
            # NOTE: uvloop's clock and timers move in whole milliseconds: a wait of less than
            # one returned at once, again and again until the clock ticked (168 turns of the loop
            # for a 0.25 ms wait, measured), a spin on the loop. Less than that left: go now.
            if deadline - loop.time() < _TIMER_STEP_S:
                return
            self._wake.clear()
            timer = loop.call_at(deadline, self._wake.set)  # a timer handle, not a polling sleep
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    async def _launch_parallel(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the next batch of a version with parallel runs (service.parallel_runs), or
        wait until one can start.

        A lone one-row request with nothing running goes alone on every thread (one sample
        cannot be split); anything more, or anything arriving while runs are going, goes to
        the one-thread runs, up to ``parallel_runs`` at once, each taking its share of the
        queue (up to the cap). A run on every thread is never joined by another: it already
        holds the cores.
        """
        # NOTE: a run on every thread is awaited right here, so none is going now.
        idle = self._narrow_running == 0
        free = self._parallel_runs - self._narrow_running
        if free == 0:
            self._wake.clear()
            await self._wake.wait()  # a run ending (or a new request, or stop) wakes it
            return
        if idle:
            # Batch mates are waited for only by a batch that would run alone; with runs going,
            # what queued meanwhile leaves at once for the free run.
            await self._wait_for_batch(loop)
            if not self._queue:
                return
            if len(self._queue) == 1 and self._queue_rows == 1:
                await self._run_batch(loop, self._take())  # alone, on every thread
                return
        share = min(self._cap, -(-self._queue_rows // free))
        parts = self._take(share)
        self._narrow_running += 1
        task = loop.create_task(self._run_batch(loop, parts, narrow=True))
        self._runs.add(task)
        task.add_done_callback(self._run_ended)

    def _run_ended(self, task: asyncio.Task[None]) -> None:
        self._runs.discard(task)
        self._narrow_running -= 1
        self._wake.set()

    async def _end_runs(self) -> None:
        """This task is ending (stopped, cancelled, or dead): so do the runs it started."""
        for task in self._runs:
            task.cancel()
        await asyncio.wait(set(self._runs))

    def _take(self, rows: int | None = None) -> list[_Part]:
        """Pop up to ``rows`` (the cap) rows, FIFO; a request too big for the room left is split."""
        parts: list[_Part] = []
        room = self._cap if rows is None else rows
        while self._queue and room > 0:
            req = self._queue[0]
            stop = min(len(req.rows), req.taken + room)
            parts.append((req, req.taken, stop))
            room -= stop - req.taken
            self._queue_rows -= stop - req.taken
            req.taken = stop
            if stop == len(req.rows):
                self._queue.popleft()
        if self._stats is not None:
            now = time.perf_counter()
            for req, start, _ in parts:
                if start == 0:  # a request's wait ends when its first rows leave the queue
                    self._stats.waited(now - req.queued_at)
        self._report_queue()
        return parts

    def _report_queue(self) -> None:
        """The queue's gauges (rows waiting, a new row's estimated wait): two slot writes."""
        if self._stats is not None:
            self._stats.gauge(self._queue_rows, self.estimated_wait(1))

    async def _run_batch(
        self, loop: asyncio.AbstractEventLoop, parts: list[_Part], narrow: bool = False
    ) -> None:
        """Run ``parts`` as one batch (``narrow``: on the one-thread run, beside others)."""
        self._running.extend(parts)
        try:
            outcome = await self._infer(loop, parts, narrow)
            if isinstance(outcome, _Failed) and len(parts) > 1:
                # One request must never fail another: find out whose rows break the backend.
                # (len(parts) counts requests: _take gives each request at most one part.)
                await self._run_each_alone(loop, parts, narrow)
            else:
                self._settle(parts, outcome)
        except asyncio.CancelledError:
            self._fail(parts, ModelNotReady, "batcher stopped while this request's batch ran")
            raise
        finally:
            for part in parts:
                self._running.remove(part)
            self._last_alone = len(parts) == 1
            self._last_done = loop.time()

    async def _run_each_alone(
        self, loop: asyncio.AbstractEventLoop, parts: list[_Part], narrow: bool = False
    ) -> None:
        # NOTE: sequential, in FIFO order, before the next batch: still one run at a time, and a
        # split request's chunk lands after its earlier chunks and before its later ones.
        for part in parts:
            if not part[0].future.done():  # cancelled meanwhile: nothing to compute
                self._settle([part], await self._infer(loop, [part], narrow))
                if self._inline:
                    await asyncio.sleep(0)  # as in _serve: let the loop breathe between runs

    async def _infer(
        self, loop: asyncio.AbstractEventLoop, parts: list[_Part], narrow: bool = False
    ) -> Array | _Failed:
        """Run ``parts`` as one batch; report it to the observer either way."""
        first, lo, hi = parts[0]
        whole = len(parts) == 1 and lo == 0 and hi == len(first.rows)
        batch = first.rows if whole else np.concatenate([r.rows[a:b] for r, a, b in parts])
        if self._inline:
            return self._infer_inline(batch, len(parts))
        started = time.perf_counter()
        ran: list[float] = []
        cpu: list[float] = []

        def timed(run: Callable[[Array], Array]) -> Callable[[Array], Array]:
            def run_timed(rows: Array) -> Array:
                began, began_cpu = time.perf_counter(), time.thread_time()
                try:
                    return run(rows)
                finally:
                    ran.append(time.perf_counter() - began)
                    cpu.append(time.thread_time() - began_cpu)

            return run_timed

        try:
            run: Callable[[Array], Array] = self._run
            executor: concurrent.futures.Executor = self._executor
            if narrow and self._parallel_run is not None and self._narrow_executor is not None:
                run, executor = self._parallel_run, self._narrow_executor
            out = await loop.run_in_executor(executor, timed(run), batch)
        except Exception as exc:
            return _Failed(_failure(exc), exc)
        finally:
            # NOTE: the backend's time in its own thread: the wall time around the await also
            # holds the event loop's delay in resuming this task, which under overload would
            # inflate every wait estimated from it (and refuse what could be answered).
            seconds = ran[0] if ran else time.perf_counter() - started
            self._measured(len(batch), seconds, len(parts), self._parallel_runs if narrow else 1)
            if self._may_inline and cpu:
                self._check_thread_cost(cpu[0])
        return _checked(out, len(batch))

    def _infer_inline(self, batch: Array, requests: int) -> Array | _Failed:
        # NOTE: the thread's CPU clock is a system call (the wall clock is not): read only
        # after a run that took long in wall time, to tell a slow model from a preempted run.
        # A run fast in wall time was fast in CPU time too (the model runs in this thread).
        timing_cpu = self._slow_wall
        started = time.perf_counter()
        started_cpu = time.thread_time() if timing_cpu else 0.0
        try:
            out = self._run(batch)
        except Exception as exc:
            return _Failed(_failure(exc), exc)
        finally:
            seconds = time.perf_counter() - started
            self._measured(len(batch), seconds, requests)
            self._slow_wall = seconds > self._inline_limit_s
            if timing_cpu:
                self._check_inline_cost(time.thread_time() - started_cpu)
            elif not self._slow_wall:
                self._check_inline_cost(seconds)
        return _checked(out, len(batch))

    def _measured(self, rows: int, seconds: float, requests: int, at_once: int = 1) -> None:
        """A run of ``rows`` took ``seconds``, beside ``at_once - 1`` others like it."""
        if self._stats is not None:
            self._stats.ran(requests, rows, seconds)
        if self._batch_s == 0.0:
            self._batch_s = seconds
        else:
            self._batch_s += _BATCH_TIME_WEIGHT * (seconds - self._batch_s)
        row_s = seconds / rows / at_once
        self._row_s = (
            row_s
            if self._row_s == 0.0
            else self._row_s + _BATCH_TIME_WEIGHT * (row_s - self._row_s)
        )

    def _check_inline_cost(self, cpu_s: float) -> None:
        """A model fast at load may turn slow (big inputs, a slower machine): stop blocking the
        loop.

        NOTE: the run's CPU time on the loop's thread, not its wall time: a run preempted by
        the OS (a busy machine, a profiler attaching) took long without costing the loop
        anything it could have spent elsewhere, and moved a 40 us model into a thread for good
        (measured: 64-row V2 requests then cost 20% more each). Several slow runs in a row, not
        one, and a model moved out comes back once its runs are fast again
        (``_check_thread_cost``).
        """
        if cpu_s <= self._inline_limit_s:
            self._slow_inline_runs = 0
            return
        self._slow_inline_runs += 1
        if self._slow_inline_runs >= _SLOW_RUNS_TO_LEAVE_THE_LOOP:
            self._inline = False
            self._fast_thread_runs = 0
            log.warning(
                "%d inline batches in a row took over %.2f ms of CPU (the last %.2f ms): running "
                "this model in a worker thread until its batches are fast again",
                self._slow_inline_runs,
                self._inline_limit_s * 1000,
                cpu_s * 1000,
            )

    def _check_thread_cost(self, cpu_s: float) -> None:
        """A model that ran inline before and left the loop: back to it after many fast runs."""
        if self._inline or cpu_s > self._inline_limit_s / 2:
            self._fast_thread_runs = 0
            return
        self._fast_thread_runs += 1
        if self._fast_thread_runs >= _FAST_RUNS_TO_RETURN:
            self._inline, self._slow_inline_runs = True, 0
            log.info(
                "%d batches in a row took under %.2f ms of CPU: running this model inline on "
                "the event loop again",
                self._fast_thread_runs,
                self._inline_limit_s * 500,
            )

    def _settle(self, parts: list[_Part], outcome: Array | _Failed) -> None:
        if isinstance(outcome, _Failed):
            self._fail(parts, BackendError, outcome.message, outcome.cause)
            return
        finite = all_finite(outcome)  # once for the batch; each request's rows only if not
        offset = 0
        for req, a, b in parts:
            chunk, offset = outcome[offset : offset + b - a], offset + b - a
            if req.future.done():  # cancelled while running: drop its result quietly
                continue
            if not finite:
                try:
                    check_finite_outputs(chunk, a)
                except InvalidInput as error:  # its own rows overflowed: it fails alone
                    req.future.set_exception(error)
                    self._discard(req)
                    continue
            if a == 0 and b == len(req.rows):  # the whole request in this batch: the usual
                req.future.set_result(chunk)
                continue
            # NOTE: by first row: with parallel runs a later chunk may finish first.
            req.chunks = {**(req.chunks or {}), a: chunk}
            req.answered += b - a
            if req.answered == len(req.rows):
                req.future.set_result(np.concatenate([req.chunks[k] for k in sorted(req.chunks)]))

    def _fail(
        self,
        parts: list[_Part],
        kind: type[FoldserveError],
        msg: str,
        cause: Exception | None = None,
    ) -> None:
        for req, _, _ in parts:
            if not req.future.done():
                # One instance per caller: a shared one would collect every raiser's traceback.
                error = kind(msg, detail=_detail(cause))
                error.__cause__ = cause
                req.future.set_exception(error)
            self._discard(req)  # a failed request's later chunks are never computed
