"""JSON bodies held to what they mean: no key twice in an object, no booleans for numbers.

Both checks look at the text orjson has already parsed and at what it made of it; neither parses
the body again. A text that passes the cheap counts (the usual case: a few one-byte searches
over its numbers, and a count outside them) is proven clean; only a text the counts cannot
vouch for is looked at more closely.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import orjson

from service.errors import InvalidInput
from service.routes.responses import quoted

# A JSON string, and whether a colon follows it (then it is a key). Scanned from the start of a
# valid text, each match begins at an opening quote: none appears outside strings otherwise.
_STRING = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*")\s*(:)?', re.DOTALL)
# The same, or a brace: enough to follow which object a key belongs to (for the error message).
_TOKEN = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*")\s*(:)?|([{}])', re.DOTALL)
# NOTE: regex searches, not `b"true" in text`: CPython's substring search skips ahead with a
# bloom filter that the letters of "true" and "false" share with digits, so on number-heavy
# text it crawls (3x slower here); the regex engine finds the literal prefix at memchr speed.
_TRUE = re.compile(rb"true")
_FALSE = re.compile(rb"false")
_CONTAINERS = (dict, list)


def check_unique_keys(text: bytes, parsed: dict[str, Any], bulk: str) -> None:
    """Refuse a JSON text in which an object names a key twice (orjson keeps the last silently,
    where another parser, e.g. a proxy's, may keep the first).

    NOTE: outside strings a colon in JSON follows a key and nothing else, so the text's colons
    are at least the keys written, and the keys written are the entries parsed plus the repeats
    dropped. A text with no more colons than the parsed objects have entries therefore repeats
    nothing: one byte count, with the entries counted without descending into the value of any
    ``bulk`` key (the numbers). Otherwise (colons inside strings, objects inside the bulk, or a
    repeat) the keys written are found exactly by scanning the strings and compared with the
    keys parsed.
    """
    start, end = _bulk_span(text)
    if start >= 0 and text.find(b":", start, end) < 0:
        colons = text.count(b":", 0, start) + text.count(b":", end)  # none between: memchr
    else:
        colons = text.count(b":")
    if colons <= len(parsed) or colons <= _entries(parsed, bulk):
        return
    written = Counter(orjson.loads(m[1]) for m in _STRING.finditer(text) if m[2] is not None)
    if written - _keys(parsed):
        names = ", ".join(quoted(name) for name in _repeated_keys(text)) or "a key"
        raise InvalidInput(
            f"the JSON body repeats {names} within one object: a key may appear once per "
            "object (which of two would count is up to the parser)"
        )


def holds_booleans(text: bytes, values: object) -> bool:
    """Whether ``values`` (a parsed JSON value, nested lists of numbers) holds true or false.

    NOTE: numpy turns booleans among numbers into 1 and 0 (``[[true, 0, 5]]`` is int64,
    ``[true, 0.5]`` float64), so the array's dtype cannot tell. A text without the words cannot
    hold the values; one with them (a parameter, a name) costs a walk of ``values``.
    """
    start, end = _bulk_span(text)
    if start >= 0 and text.find(b"t", start, end) < 0 and text.find(b"f", start, end) < 0:
        return False  # every list is within the span, and no letter of the words is
    if _TRUE.search(text) is None and _FALSE.search(text) is None:
        return False
    return _has_bool(values)


def _bulk_span(text: bytes) -> tuple[int, int]:
    """From the first ``[`` to the last ``]`` of a JSON text (-1, -1 without lists): where every
    list, the numbers of a usual body, lies. Looking for one byte there is a memchr, 100x faster
    than a search for a word (see ``_TRUE``), and on the numbers alone a letter means something.
    """
    start = text.find(b"[")
    return (start, text.rfind(b"]") + 1) if start >= 0 else (-1, -1)


# NOTE: the walks below keep their own stack: orjson parses nesting up to 1,024 deep, past
# Python's recursion limit, and a RecursionError would be a 500 for a client's mistake.


def _has_bool(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is not list:
            if type(item) is bool:
                return True
            continue
        kinds = set(map(type, item))  # at C speed: the usual row of numbers is done here
        if bool in kinds:
            return True
        if list in kinds:
            stack.extend(v for v in item if type(v) is list)
    return False


def _entries(value: dict[str, Any], bulk: str) -> int:
    """Entries of every object in ``value``, not looking inside ``bulk`` keys' values."""
    count = 0
    stack: list[dict[str, Any] | list[Any]] = [value]
    push = stack.append
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            for key, inner in item.items():
                if type(inner) in _CONTAINERS and key != bulk:
                    push(inner)
        else:
            for inner in item:
                if type(inner) in _CONTAINERS:
                    push(inner)
    return count


def _keys(value: object) -> Counter[str]:
    """Every key of every object in ``value``, the bulk included, with its count."""
    keys: Counter[str] = Counter()
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            keys.update(item.keys())
            stack.extend(v for v in item.values() if type(v) in _CONTAINERS)
        elif type(item) is list:
            kinds = set(map(type, item))
            if dict in kinds or list in kinds:
                stack.extend(v for v in item if type(v) in _CONTAINERS)
    return keys


def _repeated_keys(text: bytes) -> list[str]:
    """The keys an object of ``text`` names twice, in order: only for the error message."""
    objects: list[set[str]] = []
    repeated: list[str] = []
    for match in _TOKEN.finditer(text):
        if match[3] == b"{":
            objects.append(set())
        elif match[3] == b"}":
            objects.pop()
        elif match[2] is not None:
            key = orjson.loads(match[1])
            if key in objects[-1] and key not in repeated:
                repeated.append(key)
            objects[-1].add(key)
    return repeated
