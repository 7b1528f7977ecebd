"""The error body every protocol shares: ``{"error": message}`` (the KServe V2 convention)."""

from __future__ import annotations

import orjson


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
