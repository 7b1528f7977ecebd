"""The fast read of ``{"inputs": numbers}`` gives what the usual read gives, or steps aside."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.routes.json_numbers import MAX_FAST_BYTES, MIN_FAST_BYTES, inputs_array


def usual(body: bytes) -> np.ndarray | None:
    """What the usual path accepts: ``inputs`` alone, rectangular numbers, no booleans."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or list(payload) != ["inputs"]:
        return None
    if b"true" in body or b"false" in body:
        return None
    try:
        rows = np.asarray(payload["inputs"])
    except ValueError:
        return None
    return rows if rows.dtype.kind in "iuf" else None


@pytest.mark.parametrize("shape", [(64, 64), (64, 1, 8, 8), (1, 3), (5,)])
def test_the_usual_body_is_read_fast_and_equal(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).normal(0, 10, size=shape).round(4)
    body = orjson.dumps({"inputs": x.tolist()})
    got = inputs_array(body, min_bytes=0)
    assert got is not None and got.shape == shape and got.dtype == np.float64
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [[1,2],[3,4,5],[6]]}',  # uneven rows, as many numbers as (3, 2)
        b'{"inputs": [[1,2],[3,[4]]]}',  # a list where a number should be, same count
        b'{"inputs": [[[1],[2]],[[3],[4,5]]]}',
        b'{"inputs": [[1,true]]}',
        b'{"inputs": [[1,null]]}',
        b'{"inputs": [[1,"2"]]}',
        b'{"inputs": [[1,{}]]}',
        b'{"inputs": [[1e400]]}',
        b'{"inputs": [[1,2]], "inputs": [[5,6]]}',  # a key twice
        b'{"inputs": [[1,2]], "model": "m"}',
        b'{"input": [[1,2]]}',
        b'{"inputs": []}',
        b'{"inputs": 5}',
        b"[[1,2]]",
        b'{"inputs": [[1,2]]} trailing',
        b'{"inputs": [[1,2]',
    ],
)
def test_anything_else_is_left_to_the_usual_path(body: bytes) -> None:
    assert inputs_array(body, min_bytes=0) is None


def test_a_small_body_is_left_to_the_usual_path_which_is_as_fast_there() -> None:
    one = orjson.dumps({"inputs": [[0.5] * 64]})
    assert len(one) < MIN_FAST_BYTES and inputs_array(one) is None
    four = orjson.dumps({"inputs": [[0.5] * 64] * 4})
    assert len(four) >= MIN_FAST_BYTES and inputs_array(four) is not None


def test_a_body_over_the_fast_size_is_left_to_the_usual_path() -> None:
    rows = [[0.125] * 64] * (MAX_FAST_BYTES // (64 * 6) + 1)
    body = orjson.dumps({"inputs": rows})
    assert len(body) > MAX_FAST_BYTES and inputs_array(body) is None
    assert inputs_array(orjson.dumps({"inputs": rows[:10]})) is not None  # the parser still works


numbers = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False, width=32)
)
leaves = st.one_of(numbers, numbers, numbers, st.booleans(), st.none(), st.just("1"))
nested: st.SearchStrategy[Any] = st.recursive(
    leaves, lambda inner: st.lists(inner, min_size=1, max_size=4), max_leaves=24
)


def regular(shape: list[int], draw_leaf: Any) -> Any:
    if not shape:
        return draw_leaf()
    return [regular(shape[1:], draw_leaf) for _ in range(shape[0])]


@settings(max_examples=300, deadline=None)
@given(value=nested, extra=st.booleans())
def test_whatever_the_body_the_fast_read_equals_the_usual_one_or_steps_aside(
    value: Any, extra: bool
) -> None:
    payload = {"inputs": value, **({"model": "m"} if extra else {})}
    body = orjson.dumps(payload)
    got, want = inputs_array(body, min_bytes=0), usual(body)
    if got is None:
        return  # the usual path reads it (and refuses it when it must)
    assert want is not None, (body, got)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want.astype(np.float64))


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_every_regular_nesting_of_numbers_is_read_fast(shape: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    value = regular(shape, lambda: round(float(rng.normal()), 3))
    got = inputs_array(orjson.dumps({"inputs": value}), min_bytes=0)
    assert got is not None and list(got.shape) == shape
    np.testing.assert_array_equal(got, np.asarray(value))
