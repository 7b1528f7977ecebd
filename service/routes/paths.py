"""Path parameters shared by every protocol's routes."""

from __future__ import annotations

from service.errors import InvalidInput


def path_version(text: str | None) -> int | None:
    """The version named in a URL path (``.../versions/{v}/...``), or None when it names none."""
    if text is None:
        return None
    if not text.isascii() or not text.isdigit():
        raise InvalidInput(f"version in the path must be a positive integer, got {text!r}")
    return int(text)
