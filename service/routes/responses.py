"""The error body every protocol shares: ``{"error": message}`` (the KServe V2 convention)."""

from __future__ import annotations

import orjson

_SCALARS = (str, int, float, bool, type(None))


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


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
