"""The error body every protocol shares: ``{"error": message}`` (the KServe V2 convention)."""

from __future__ import annotations

import logging
import secrets

import orjson

log = logging.getLogger(__name__)
_SCALARS = (str, int, float, bool, type(None))


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def unexpected(exc: BaseException, where: str) -> str:
    """Log an unexpected exception in full and return what the client reads: no type, message
    or traceback (they may name server paths or library internals), only an id to find the
    log entry by."""
    error_id = secrets.token_hex(4)
    log.error("unexpected error %s in %s", error_id, where, exc_info=exc)
    return f"internal error {error_id}: see the server log"


def quoted(value: object, limit: int = 60) -> str:
    """A value a client sent, as an error message shows it: its repr, cut to ``limit``
    characters, or for a list or object holding lists or objects (or many items), its kind and
    size. NOTE: the repr of a list nested 1,000 deep (orjson parses up to 1,024) exceeds
    Python's recursion limit: a 500 and a traceback instead of the 400."""
    if isinstance(value, list | dict):
        items = value.values() if isinstance(value, dict) else value
        if len(value) > 16 or not all(isinstance(item, _SCALARS) for item in items):
            kind = "an object" if isinstance(value, dict) else "a list"
            return f"{kind} of {len(value)} item{'' if len(value) == 1 else 's'}"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
