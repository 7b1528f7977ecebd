"""The gate in front of a model version's queue: a request reads its body only once it fits.

Under overload, refusing a request after reading and parsing its body spends the CPU the
admitted requests need; refused clients retry at once and the server ends up parsing requests
only to refuse them (issue 9: 13% of peak goodput at 16x the best concurrency). So requests
pass the gate while the requests inside (reading, parsing, queued, running) are expected to fit
``max_queue_rows``; the others wait in FIFO order with their body unread, which costs nothing
but a socket buffer, and pass as the ones inside are answered. A waiter that cannot be answered
before its deadline is refused at once, before its body is read (503, Retry-After).

Rows per request are not known before the body is parsed: the gate counts requests and learns
the rows per request from the queue (a moving average), so that one-row traffic passes
thousands at a time and 1,024-row requests a few.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

# NOTE: weight of the newest request in the rows-per-request average: about the last five
# requests count, so a change of traffic shows within a few requests.
_ROWS_WEIGHT = 0.2
# NOTE: weight of the newest interval between answers in their average (about the last ten).
_INTERVAL_WEIGHT = 0.1


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
