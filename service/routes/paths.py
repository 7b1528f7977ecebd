"""Versions as every protocol's routes read them: in a URL path, or in a JSON body.

A path's text is checked before it is converted: Python refuses ``int()`` of more than 4,300
digits with a ValueError (a 500 and a traceback if it escaped).
"""

from __future__ import annotations

from service.errors import InvalidInput, ModelNotFound

# NOTE: the form the store gives its version folders (service/store.py): ASCII digits, no
# leading zero, at most 9 digits. "01", "+1", " 1", "1.0" or "²" name no folder; they are
# refused as malformed (400), while a well-formed version the model lacks is not found (404).
MAX_VERSION = 999_999_999


def path_version(text: str | None) -> int | None:
    """The version named in a URL path (``.../versions/{v}/...``), or None when it names none."""
    if text is None:
        return None
    if not (0 < len(text) <= 9 and text.isascii() and text.isdigit() and text[0] != "0"):
        raise InvalidInput(
            f"version in the path must be a positive integer, got {_shown(text)}: write it as "
            f"its folder is named (1 to {MAX_VERSION}, no leading zero, sign or space)"
        )
    return int(text)


def v2_path_version(name: str, text: str | None) -> int | None:
    """A version as the Open Inference Protocol reads it: any other spelling names no version
    of the model, so 404 (the protocol's own example of a version is ``v10``)."""
    try:
        return path_version(text)
    except InvalidInput:
        assert text is not None
        raise ModelNotFound(
            f"model {name!r} has no version {_shown(text)}: versions are numbered as their "
            f"folders are (1 to {MAX_VERSION})"
        ) from None


def check_version(number: int) -> int:
    """A version a JSON body names (orjson has already bounded it to 64 bits)."""
    if not 1 <= number <= MAX_VERSION:
        raise InvalidInput(f'"version" must be from 1 to {MAX_VERSION}, got {_shown(str(number))}')
    return number


def _shown(text: str) -> str:
    """``text`` as a message quotes it: a 5,000-digit "version" is not echoed whole."""
    return repr(text) if len(text) <= 24 else f"{text[:20]!r}... ({len(text)} characters)"
