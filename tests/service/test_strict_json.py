"""Repeated keys and booleans found from the parsed value and its text, without a second parse:
the same verdicts as a parser that sees every key, on any JSON text."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import InvalidInput
from service.routes import strict_json
from service.routes.strict_json import check_unique_keys, holds_booleans

# Few keys, so that objects repeat them; with colons, quotes, backslashes, braces and the words
# the checks look for, so that strings hold what the counts could mistake for structure.
KEYS = st.sampled_from(["inputs", "data", "a", "a:b", ":", 'q"', '"a":', "\\", "true", "x{", "}"])
LEAVES = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
    | KEYS
)
# An object is a list of (key, value) pairs: it may name a key twice, as a text can.
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.builds(lambda pairs: ("object", pairs), st.lists(st.tuples(KEYS, inner), max_size=4))
    ),
    max_leaves=20,
)


def dump(value: Any, spaced: bool, ascii_only: bool) -> str:
    """JSON text of ``value``, objects written pair by pair (repeats and all)."""
    if isinstance(value, tuple):
        colon = " : " if spaced else ":"
        pairs = (f"{json.dumps(k, ensure_ascii=ascii_only)}{colon}" for k, _ in value[1])
        items = (p + dump(v, spaced, ascii_only) for p, (_, v) in zip(pairs, value[1], strict=True))
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, spaced, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def repeats(text: str) -> set[str]:
    """The keys some object repeats, as Python's parser sees every pair."""
    found: set[str] = set()

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        found.update(k for k in keys if keys.count(k) > 1)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return found


@settings(max_examples=250, deadline=None)
@given(
    value=st.builds(lambda pairs: ("object", pairs), st.lists(st.tuples(KEYS, VALUES))),
    spaced=st.booleans(),
    ascii_only=st.booleans(),
    bulk=st.sampled_from(["inputs", "data"]),
)
def test_repeated_keys_are_found_exactly(
    value: Any, spaced: bool, ascii_only: bool, bulk: str
) -> None:
    text = dump(value, spaced, ascii_only).encode()
    expected = repeats(text.decode())
    if not expected:
        check_unique_keys(text, orjson.loads(text), bulk)
        return
    with pytest.raises(InvalidInput) as refused:
        check_unique_keys(text, orjson.loads(text), bulk)
    assert "within one object" in refused.value.message
    assert set(strict_json._repeated_keys(text)) == expected  # what the message names


NUMBERS = st.integers(-(2**31), 2**31) | st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    values=st.recursive(NUMBERS | st.booleans(), lambda inner: st.lists(inner, max_size=5)),
    note=st.sampled_from(["", "true", "false", "untrue"]),
)
def test_booleans_are_found_at_any_depth(values: Any, note: str) -> None:
    """``note``: the words in a string elsewhere in the text (a name, a parameter)."""
    text = orjson.dumps({"name": note, "data": values})

    def any_bool(value: Any) -> bool:
        if isinstance(value, list):
            return any(any_bool(v) for v in value)
        return isinstance(value, bool)

    assert holds_booleans(text, values) == any_bool(values)


def test_the_usual_body_costs_a_few_byte_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No scan of strings, no search for a word, no walk of the numbers, for a body whose lists
    hold numbers only: one-byte searches (memchr) over its numbers, a count outside them."""

    class Untouchable:
        def finditer(self, text: bytes) -> Any:
            raise AssertionError("the strings were scanned")

        def search(self, text: bytes) -> Any:
            raise AssertionError("the text was searched for a word")

    def no_walk(value: Any) -> bool:
        raise AssertionError("the values were walked")

    monkeypatch.setattr(strict_json, "_STRING", Untouchable())
    monkeypatch.setattr(strict_json, "_TRUE", Untouchable())
    monkeypatch.setattr(strict_json, "_FALSE", Untouchable())
    monkeypatch.setattr(strict_json, "_has_bool", no_walk)
    text = b'{"inputs": [[0.5, 1, -2e-05]], "model": "tiny", "version": 1}'
    check_unique_keys(text, orjson.loads(text), "inputs")
    assert not holds_booleans(text, orjson.loads(text)["inputs"])
