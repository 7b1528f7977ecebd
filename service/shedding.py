"""Load shedding: refuse what would be answered too late, early and cheaply, and say so once.

A request carries a time budget: its own (``X-Request-Timeout`` in seconds, or V2's
``parameters.timeout`` in microseconds as Triton reads it), never more than the server's
``request_timeout_s``. It is admitted only if the batcher's estimated wait fits the budget; under
overload the refusals come in thousands a second, so the log gets one line when shedding starts
and one summary per interval while it goes on, never a line per request
(``service.repeated_log``).
"""

from __future__ import annotations

import logging
import math

from service.errors import InvalidInput

log = logging.getLogger(__name__)

TIMEOUT_HEADER = b"x-request-timeout"


def requested_timeout(value: bytes | None) -> float | None:
    """Seconds from an ``X-Request-Timeout`` header value; None when absent."""
    if value is None:
        return None
    # NOTE: 20 bytes is plenty for any sane number; longer input never reaches float(), whose cost
    # grows with the digits.
    try:
        seconds = float(value) if len(value) <= 20 else math.nan
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidInput(
            f"X-Request-Timeout must be a positive number of seconds, got {value[:20]!r}"
        )
    return seconds


def timeout_parameter(parameters: object) -> float | None:
    """Seconds from a V2 request's ``parameters.timeout`` (microseconds); None when absent."""
    if not isinstance(parameters, dict) or "timeout" not in parameters:
        return None
    micros = parameters["timeout"]
    if isinstance(micros, bool) or not isinstance(micros, int) or micros <= 0:
        # NOTE: named by kind, never repr'd: a client's value may be nested a thousand deep.
        shown = (
            "a negative number or 0" if isinstance(micros, int) else "a " + type(micros).__name__
        )
        raise InvalidInput(
            f'parameters "timeout" must be a positive integer (microseconds), got {shown}'
        )
    # A huge budget is no error: the server's request_timeout_s caps it anyway.
    return min(micros, 10**12) / 1e6
