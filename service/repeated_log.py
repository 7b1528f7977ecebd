"""Log lines that come in thousands: the first of a run in full, then a count per interval.

Shedding under overload, 503s while a model loads or after it is unloaded, timeouts of a client
holding connections open: each can happen for every request, and a line for each (50,837 lines
in 60 s of load/unload churn, measured) buries what the log is for. The first one of a run is
logged with its whole message; while more follow, one line per interval counts them by model and
reason; an interval with none ends the run, and the next one is logged in full again. The counts
are in /metrics whatever the log says (``foldserve_requests_total`` by code,
``foldserve_requests_shed_total`` by reason).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

SUMMARY_INTERVAL_S = 10.0


class RepeatedLog:
    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        level: int = logging.WARNING,
        interval_s: float = SUMMARY_INTERVAL_S,
    ) -> None:
        self._log = logger
        self._what = what  # "shedding load": the first line says it, the summaries count it
        self._level = level
        self._interval_s = interval_s
        self._counts: Counter[tuple[str, str]] = Counter()
        self._active = False

    def note(self, model: str, reason: str, message: str) -> None:
        """One more; ``message`` is logged only if it starts a run."""
        if self._active:
            self._counts[(model, reason)] += 1
            return
        self._active = True
        self._log.log(
            self._level,
            "%s: %s (more are counted every %g s)",
            self._what,
            message,
            self._interval_s,
        )
        asyncio.get_running_loop().call_later(self._interval_s, self._summarize)

    def _summarize(self) -> None:
        if not self._counts:
            self._active = False  # quiet for a whole interval: the next one logs again
            return
        parts = ", ".join(
            f"{model or '?'} ({reason}) {count}" for (model, reason), count in self._counts.items()
        )
        self._log.log(
            self._level,
            "%s: %d more in the last %g s: %s",
            self._what,
            sum(self._counts.values()),
            self._interval_s,
            parts,
        )
        self._counts.clear()
        asyncio.get_running_loop().call_later(self._interval_s, self._summarize)
