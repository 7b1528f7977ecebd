"""A binary request's JSON header is parsed once per distinct text, and answers as if every time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.errors import InvalidInput
from service.packing import Signature, packing
from service.routes import v2 as v2_routes
from service.routes.v2 import V2Codec
from service.routes.v2_headers import AnswerHeaders, Header, HeaderMemo, answer_header
from service.settings import Settings
from service.store import TensorSpec
from tests.service.conftest import SHAPE, reference
from tests.service.test_v2 import INFER, base, binary_answer, binary_body, tensor, v2_store

__all__ = ["base", "v2_store"]  # the module's fixtures, used here


def parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every header text the V2 codec parses from now on."""
    seen: list[bytes] = []
    real = v2_routes._payload

    def counted(text: bytes) -> dict[str, Any]:
        seen.append(text)
        return real(text)

    monkeypatch.setattr(v2_routes, "_payload", counted)
    return seen


def test_a_repeated_header_is_parsed_once_and_each_answer_is_its_own(
    base: str, v2_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = parses(monkeypatch)
    rng = np.random.default_rng(3)
    header = {"inputs": [tensor(np.zeros((2, *SHAPE)), parameters={"binary_data_size": 2 * 64})]}
    header["parameters"] = {"binary_data_output": True}
    for _ in range(5):  # the same header, other numbers each time
        x = rng.normal(size=(2, *SHAPE)).astype("<f4")
        content, headers = binary_body(header, x.tobytes())
        _, out = binary_answer(httpx.post(base + INFER, content=content, headers=headers))
        np.testing.assert_allclose(out, reference(v2_store, x), rtol=1e-5, atol=1e-6)
    assert len(seen) == 1
    # A binary part of the wrong length is still refused, with a kept header.
    content, headers = binary_body(header, b"\0" * 12)
    answer = httpx.post(base + INFER, content=content, headers=headers)
    assert answer.status_code == 400 and "binary_data_size is 128 but 12 bytes" in answer.text
    assert len(seen) == 1


def test_a_header_with_an_id_is_parsed_every_time_and_an_error_is_never_kept(
    base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = parses(monkeypatch)
    x = np.ones((1, *SHAPE), dtype="<f4")
    for n in range(3):
        header = {"id": "same", "inputs": [tensor(x, parameters={"binary_data_size": x.nbytes})]}
        content, headers = binary_body(header, x.tobytes())
        answer = httpx.post(base + INFER, content=content, headers=headers)
        assert answer.status_code == 200 and orjson.loads(answer.content)["id"] == "same"
        wrong = {"inputs": [{**tensor(x), "name": "y", "parameters": {"binary_data_size": 64}}]}
        content, headers = binary_body(wrong, x.tobytes())
        answer = httpx.post(base + INFER, content=content, headers=headers)
        assert answer.status_code == 400 and "input is named 'y'" in answer.text
        # The id's header every time; the wrong one parsed once, its check failing each time.
        assert len(seen) == n + 2


def test_a_kept_header_is_checked_again_against_another_input() -> None:
    """A header is kept per (text, path); what it means for a model's input is kept per spec: a
    version whose input changed (a swap) re-checks it and refuses what no longer fits."""
    codec = V2Codec(Settings())
    text = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                     "parameters": {"binary_data_size": 16}}]}
    )  # fmt: skip
    body = text + np.arange(4, dtype="<f4").tobytes()
    request = SimpleNamespace(head=SimpleNamespace(inference_header_length=str(len(text)).encode()))
    out = TensorSpec(name="y", shape=(2,))

    def version(shape: tuple[int, ...]) -> Any:
        inputs = packing((TensorSpec(name="x", shape=shape),))
        return SimpleNamespace(
            signature=Signature(inputs, packing((out,))), manifest=SimpleNamespace(image=None)
        )

    fits, changed = version((4,)), version((2, 2))
    first = codec.parse(body, request, "m", None)  # type: ignore[arg-type]
    np.testing.assert_array_equal(codec.rows(first, fits), [[[0, 1, 2, 3]]])
    again = codec.parse(body, request, "m", None)  # type: ignore[arg-type]
    assert again.payload.header is first.payload.header  # kept
    with pytest.raises(InvalidInput, match=r"shape must be \[n, 2, 2\]"):
        codec.rows(again, changed)
    np.testing.assert_array_equal(codec.rows(again, fits), [[[0, 1, 2, 3]]])


def test_the_table_forgets_the_oldest_header_past_its_capacity() -> None:
    memo = HeaderMemo(capacity=2)
    kept = [Header({}, f"h{i}".encode(), None, None, None) for i in range(3)]
    for header in kept:
        memo.keep(header, "m", None)
    assert memo.get(b"h0", "m", None) is None
    assert memo.get(b"h1", "m", None) is kept[1] and memo.get(b"h2", "m", None) is kept[2]
    assert memo.get(b"h2", "m", 1) is None and memo.get(b"h2", "other", None) is None


def test_an_answer_header_is_written_once_per_shape_and_says_what_follows() -> None:
    answers = AnswerHeaders(capacity=2)
    first = answers.header("m", 3, "logits", (2, 4))
    assert answers.header("m", 3, "logits", (2, 4)) is first
    assert orjson.loads(first) == {
        "model_name": "m",
        "model_version": "3",
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [2, 4],
             "parameters": {"binary_data_size": 32}}
        ],
    }  # fmt: skip
    other = orjson.loads(answers.header("m", 3, "logits", (5, 4)))
    assert other["outputs"][0]["parameters"]["binary_data_size"] == 80
    with_id = orjson.loads(answer_header("m", 3, "logits", (2, 4), "req-1"))
    assert with_id["id"] == "req-1" and with_id["outputs"] == orjson.loads(first)["outputs"]
