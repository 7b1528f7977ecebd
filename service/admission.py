"""Admission: the one place that decides whether a request is served or refused, and when.

Two decisions per request, each as early as what it needs is known:

1. **Before the body is read** (``Admission.enter``): requests pass a gate while the requests
   inside (reading, parsing, queued, running) are expected to fit the version's queue
   (``max_queue_rows``); the others wait in FIFO order with their body unread, which costs nothing
   but a socket buffer, and pass as the ones inside are answered. A waiter that cannot be answered
   before its deadline is refused at once (503, Retry-After), before its body is read.
2. **Once its rows are known** (``Ticket.admit``): a request the queue can never hold is refused
   with 413; one it cannot hold now waits for room (its body is read: refusing it would waste
   that), refused with 503 only if its deadline passes first; one whose estimated answer comes
   after its deadline is refused with 503. The batcher trusts this: it never refuses.

Under overload, refusing a request after reading and parsing its body spends the CPU the admitted
requests need; refused clients retry at once and the server ends up parsing requests only to
refuse them (issue 9: 13% of peak goodput at 16x the best concurrency). Hence the gate.

Rows per request are not known before the body is parsed: the gate counts requests and learns
the rows per request from admitted requests (a moving average), so that one-row traffic passes
thousands at a time and 1,024-row requests a few.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Protocol

from service.errors import Overloaded, PayloadTooLarge

# NOTE: weight of the newest request in the rows-per-request average: about the last five
# requests count, so a change of traffic shows within a few requests.
_ROWS_WEIGHT = 0.2
# NOTE: weight of the newest interval between answers in their average (about the last ten).
_INTERVAL_WEIGHT = 0.1
# NOTE: a request that would wait at the gate is refused at once only when its estimated wait
# passes twice its time left; otherwise it waits (no CPU: its body is unread) and is refused when
# its time runs out. Estimates made while the loop is saturated run high, and closed-loop
# clients retry a refusal at once: refusing on a pessimistic estimate starts a storm of cheap
# but not free refusals (measured: 218 good answers/s instead of 356 at 256 connections).
_HOPELESS = 2.0


class Queue(Protocol):
    """What admission reads of a version's batcher."""

    @property
    def queue_rows(self) -> int: ...

    def estimated_wait(self, rows: int) -> float: ...

    def now(self) -> float:
        """The event loop's clock, which deadlines are counted on."""
        ...


class Gate:
    def __init__(self, max_rows: int) -> None:
        self._max_rows = max_rows
        self._inside = 0  # requests past the gate and not yet answered
        self._rows_per_request = 1.0
        self._waiting: deque[asyncio.Future[None]] = deque()
        # While requests wait, the gate sees how fast the ones inside are answered: that rate
        # counts everything a request costs (parsing, queue, batch, encoding), not the batches
        # alone, so it tells a waiter's wait even when the event loop is the bottleneck.
        self._interval = 0.0  # seconds between answers while saturated (0: not measured yet)
        self._last_leave = 0.0
        self._saturated_since = 0.0

    @property
    def rows_per_request(self) -> float:
        return self._rows_per_request

    @property
    def capacity(self) -> int:
        """Requests let inside at once: as many as the queue holds at the rows they bring."""
        return max(1, int(self._max_rows / self._rows_per_request))

    @property
    def inside(self) -> int:
        return self._inside

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def is_open(self) -> bool:
        return not self._waiting and self._inside < self.capacity

    def rows_waiting(self) -> int:
        """Rows of the requests waiting at the gate, and of one more, as the average says."""
        return round((len(self._waiting) + 1) * self._rows_per_request)

    def expected_wait(self) -> float:
        """Seconds until one more waiter would be answered, at the measured rate of answers
        (0 before the gate was ever full)."""
        return (len(self._waiting) + 1 + self._inside) * self._interval

    def note_rows(self, rows: int) -> None:
        self._rows_per_request += _ROWS_WEIGHT * (rows - self._rows_per_request)

    def enter_now(self) -> bool:
        """Take a place inside if the gate is open (no one waits and there is room)."""
        if not self.is_open():
            return False
        self._inside += 1
        return True

    async def wait(self, timeout_s: float | None) -> bool:
        """Wait in line for a place inside; False when ``timeout_s`` passed first (no place)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._waiting:
            self._saturated_since = time.perf_counter()
        self._waiting.append(turn)
        try:
            await asyncio.wait_for(
                asyncio.shield(turn), None if timeout_s is None else max(timeout_s, 0.0)
            )
        except TimeoutError:
            pass
        except BaseException:  # cancelled: the client went away
            self._give_up(turn)
            raise
        if turn.done():
            return True
        self._give_up(turn)
        return False

    def _give_up(self, turn: asyncio.Future[None]) -> None:
        if not turn.done():
            self._waiting.remove(turn)
            turn.cancel()
        elif not turn.cancelled():
            # NOTE: leave() handed this waiter a place just as it gave up: give it back.
            self.leave()

    def leave(self) -> None:
        self._inside -= 1
        if self._waiting:
            now = time.perf_counter()
            # Between two answers while requests wait; the first answer after the gate filled
            # only starts the clock (its time since then holds the parsing of a whole gateful).
            if self._last_leave > self._saturated_since:
                interval = now - self._last_leave
                self._interval += (
                    _INTERVAL_WEIGHT * (interval - self._interval) if self._interval else interval
                )
            self._last_leave = now
        while self._waiting and self._inside < self.capacity:
            turn = self._waiting.popleft()
            if not turn.done():
                self._inside += 1  # handed over: the waiter holds it when it wakes
                turn.set_result(None)


class Admission:
    """One version's admission: its gate, its queue's bound, and the batcher it fills."""

    def __init__(
        self, name: str, version: int, queue: Queue, max_queue_rows: int, queue_limit: str
    ) -> None:
        self.name = name
        self.version = version
        self.queue = queue
        self.max_queue_rows = max_queue_rows
        self.queue_limit = queue_limit  # the setting that bounds the queue, for messages
        self.gate = Gate(max_queue_rows)
        self._room: list[asyncio.Future[None]] = []  # requests read, waiting for queue room

    async def enter(self, deadline: float | None) -> Ticket:
        """Pass the gate before the body is read: at once while the queue has room, else in
        line with the body unread; refused (503) when the wait would outlast ``deadline`` (the
        loop's clock; None: no deadline)."""
        ticket = self.try_enter(deadline)
        return ticket if ticket is not None else await self.wait_to_enter(deadline)

    def try_enter(self, deadline: float | None) -> Ticket | None:
        """``enter`` when the gate is open: a place at once (or 503 when the request could not
        be answered by ``deadline``); None when it is closed: ``wait_to_enter`` then."""
        gate = self.gate
        if not gate.enter_now():
            return None
        # The rows a request brings, as far as anyone knows before its body: the recent average.
        rows = max(1, round(gate.rows_per_request))
        if deadline is not None:
            # 503 now rather than after reading and parsing a body that cannot make it.
            wait = self.queue.estimated_wait(rows)
            left = deadline - self.queue.now()
            if wait > left:
                gate.leave()
                raise self.too_late(wait, left)
        return Ticket(self, rows)

    async def wait_to_enter(self, deadline: float | None) -> Ticket:
        """``enter`` through a closed gate: in line, with the body unread."""
        gate = self.gate
        remaining = None if deadline is None else deadline - self.queue.now()
        if remaining is not None:
            wait = max(self.queue.estimated_wait(gate.rows_waiting()), gate.expected_wait())
            if wait > _HOPELESS * remaining:
                raise self.too_late(wait, remaining)
        if not await gate.wait(remaining):
            raise self.too_late(self.queue.estimated_wait(gate.rows_waiting()), 0.0)
        return Ticket(self, 0)  # waited: its time left is checked again with its rows

    def enter_now(self) -> Ticket:
        """A place without waiting (a request whose body named this version after it passed
        another's gate): refused (503) when none is free."""
        if not self.gate.enter_now():
            raise Overloaded(
                f"model {self.name!r} v{self.version} is busy: {self.gate.waiting} requests "
                "wait for it; retry shortly",
                model=self.name,
                version=self.version,
            )
        return Ticket(self, 0)

    async def wait_for_room(self, rows: int, deadline: float | None) -> None:
        """Until the queue has room for ``rows`` (every answer may have freed some), or 503 when
        ``deadline`` passes first."""
        loop = asyncio.get_running_loop()
        while self.queue.queue_rows + rows > self.max_queue_rows:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise self.queue_full(rows)
            freed: asyncio.Future[None] = loop.create_future()
            self._room.append(freed)
            try:
                await asyncio.wait_for(freed, left)
            except TimeoutError:
                raise self.queue_full(rows) from None

    def room_freed(self) -> None:
        waiting, self._room = self._room, []
        for freed in waiting:
            if not freed.done():
                freed.set_result(None)

    def queue_full(self, rows: int) -> Overloaded:
        waiting = self.queue.queue_rows
        return Overloaded(
            f"queue full for model {self.name!r} v{self.version}: {waiting} of "
            f"{self.max_queue_rows} rows wait ({self.queue_limit}), no room for {rows} more "
            "before the request's deadline; retry shortly",
            model=self.name,
            version=self.version,
        )

    def too_late(self, wait: float, left: float) -> Overloaded:
        return Overloaded(
            f"model {self.name!r} v{self.version} would answer in about {wait * 1000:.0f} ms, "
            f"after the request's deadline ({max(left, 0.0) * 1000:.0f} ms left): refused now "
            "rather than answered too late; retry later or allow more time (X-Request-Timeout)",
            retry_after_s=max(1, math.ceil(wait)),
            reason="deadline",
            model=self.name,
            version=self.version,
        )


class Ticket:
    """A request's place inside a version's gate, from ``enter`` until ``leave``."""

    __slots__ = ("_admission", "_checked_rows", "_left")

    def __init__(self, admission: Admission, checked_rows: int) -> None:
        self._admission = admission
        self._checked_rows = checked_rows  # rows whose wait was checked against the deadline
        self._left = False

    @property
    def admission(self) -> Admission:
        return self._admission

    async def admit(self, rows: int, deadline: float | None) -> None:
        """Refuse ``rows`` the queue can never hold (413) or could not answer before
        ``deadline`` (503, Retry-After); while the queue is full, wait (its body is read
        already: refusing it now would waste that) until answers free room, or its deadline
        passes (503). Then the batcher takes them."""
        if not self.admit_now(rows, deadline):
            await self.admit_when_room(rows, deadline)

    def admit_now(self, rows: int, deadline: float | None) -> bool:
        """``admit`` while the queue has room; False when it is full: ``admit_when_room``."""
        a = self._admission
        a.gate.note_rows(rows)
        limit = a.max_queue_rows
        if rows > limit:
            # 413, not 503: this request can never fit, so a client retrying on 503 would loop.
            raise PayloadTooLarge(
                f"request has {rows} rows but at most {limit} can queue for model {a.name!r} "
                f"v{a.version} ({a.queue_limit}): send fewer rows per request or raise the limit"
            )
        if a.queue.queue_rows + rows > limit:
            return False
        self._check_time(rows, deadline)
        return True

    async def admit_when_room(self, rows: int, deadline: float | None) -> None:
        """The rest of ``admit`` for rows that found the queue full."""
        await self._admission.wait_for_room(rows, deadline)
        self._check_time(rows, deadline)

    def _check_time(self, rows: int, deadline: float | None) -> None:
        a = self._admission
        if deadline is not None and rows > self._checked_rows:
            # 503 now rather than 504 later: the batches it would take go to requests that can
            # still be answered in time. (Checked at the gate already for the rows expected.)
            wait = a.queue.estimated_wait(rows)
            left = deadline - a.queue.now()
            if wait > left:
                raise a.too_late(wait, left)

    def leave(self) -> None:
        """Answered (or given up): the next waiter may come in. Idempotent."""
        if not self._left:
            self._left = True
            self._admission.gate.leave()
            self._admission.room_freed()
