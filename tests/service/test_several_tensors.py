"""Models with several named inputs and outputs, served end to end on the production server:
/predict and V2 (JSON and binary, inputs in any order, all outputs or those asked for), metadata
and config, and batching that keeps each request's inputs together."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch

from service.app import create_app
from service.backends import BackendOptions
from service.backends.torchscript import TorchScriptBackend
from service.packing import Signature, packing
from service.settings import Settings
from service.store import Manifest, TensorSpec, read_manifest
from tests.service.conftest import running
from tests.service.pair_model import (
    A_SHAPE,
    B_SHAPE,
    LABELS,
    add_pair_version,
    pair_inputs,
    pair_reference,
)

INFER = "/v2/models/pair/infer"


class AsTuple(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a.sum(dim=1, keepdim=True) + b.flatten(1).sum(dim=1, keepdim=True), 3 * b


class AsDict(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        total = a.sum(dim=1, keepdim=True) + b.flatten(1).sum(dim=1, keepdim=True)
        return {"scaled": 3 * b, "total": total}


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pair") / "store"
    add_pair_version(root)
    return root


@pytest.fixture(scope="module")
def base(pair_store: Path) -> Iterator[str]:
    # Every batch waits for mates (no lone request runs at once): concurrent requests share.
    settings = Settings(
        model_store=pair_store, default_model="pair", adaptive_delay=False, max_delay_ms=20.0
    )
    with running(create_app(settings)) as (url, _):
        yield url


def close(got: Any, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), expected, rtol=0, atol=1e-5)


def test_the_manifest_records_both_inputs_and_outputs_and_golden_rows_side_by_side(
    pair_store: Path,
) -> None:
    manifest = read_manifest(pair_store / "pair" / "1")
    assert [(s.name, s.shape) for s in manifest.inputs] == [("a", A_SHAPE), ("b", B_SHAPE)]
    assert [s.name for s in manifest.outputs] == ["logits", "scaled"]
    assert len(manifest.golden.inputs[0]) == 3 + 4 and len(manifest.golden.outputs[0]) == 4 + 4


def test_predict_takes_inputs_by_name_and_answers_every_output_by_name(base: str) -> None:
    x = pair_inputs(3, seed=1)
    expected = pair_reference(x)
    body = {"inputs": {"b": x["b"].tolist(), "a": x["a"].tolist()}}  # any order
    answer = httpx.post(f"{base}/predict", json=body)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert set(got["outputs"]) == {"logits", "scaled"}
    close(got["outputs"]["logits"], expected["logits"])
    close(got["outputs"]["scaled"], expected["scaled"])
    # Predictions read the first output, the one the labels name.
    assert got["predictions"] == [LABELS[i] for i in expected["logits"].argmax(axis=1)]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([[0.0, 1.0, 2.0]], 'this model takes 2 inputs: send "inputs": {"a"'),
        ([[0.5, 1.5, 2.5]] * 80, "this model takes 2 inputs"),  # over 1 kB: the fast path's
        ({"a": [[0.0, 1.0, 2.0]]}, "this model takes ['a', 'b']"),
        ({"a": [[0.0] * 3], "b": [[0.0] * 4], "c": [[1.0]]}, "this model takes ['a', 'b']"),
        ({"a": [[0.0] * 3] * 2, "b": [[0.0] * 4]}, "every input must hold as many samples"),
        ({"a": [[0.0] * 3], "b": [[0.0] * 5]}, "input 'b': expected samples shaped (n, 2, 2)"),
        ({"a": [[0.0] * 3], "b": "x"}, 'input "b" must be a list of samples'),
        ({"a": [[0.0, True, 2.0]], "b": [[0.0] * 4]}, 'input "a" must hold numbers only'),
    ],
)
def test_predict_refuses_inputs_that_do_not_name_the_models_own(
    base: str, inputs: Any, message: str
) -> None:
    answer = httpx.post(f"{base}/predict", json={"inputs": inputs})
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_v2_json_infer_answers_every_output_whatever_the_inputs_order(base: str) -> None:
    x = pair_inputs(2, seed=2)
    expected = pair_reference(x)
    request = {
        "id": "r-1",
        "inputs": [
            {"name": "b", "datatype": "FP64", "shape": [2, 2, 2], "data": x["b"].ravel().tolist()},
            {"name": "a", "datatype": "FP32", "shape": [2, 3], "data": x["a"].ravel().tolist()},
        ],
    }
    answer = httpx.post(f"{base}{INFER}", json=request)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["id"] == "r-1"
    tensors = {t["name"]: t for t in got["outputs"]}
    assert [t["name"] for t in got["outputs"]] == ["logits", "scaled"]
    assert tensors["scaled"]["shape"] == [2, 2, 2]
    for name in ("logits", "scaled"):
        close(np.reshape(tensors[name]["data"], tensors[name]["shape"]), expected[name])


def test_v2_binary_inputs_in_any_order_and_outputs_asked_for_each_in_its_own_form(
    base: str,
) -> None:
    x = pair_inputs(4, seed=3)
    expected = pair_reference(x)
    b_raw, a_raw = x["b"].astype("<f4").tobytes(), x["a"].astype("<f8").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "b", "datatype": "FP32", "shape": [4, 2, 2],
                 "parameters": {"binary_data_size": len(b_raw)}},
                {"name": "a", "datatype": "FP64", "shape": [4, 3],
                 "parameters": {"binary_data_size": len(a_raw)}},
            ],
            "outputs": [
                {"name": "scaled", "parameters": {"binary_data": True}},
                {"name": "logits", "parameters": {"binary_data": False}},
            ],
        }
    )  # fmt: skip
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    for _ in range(2):  # the second time from the header kept (service.routes.v2_headers)
        answer = httpx.post(f"{base}{INFER}", content=header + b_raw + a_raw, headers=headers)
        assert answer.status_code == 200, answer.text
        length = int(answer.headers["inference-header-content-length"])
        got = orjson.loads(answer.content[:length])
        assert [t["name"] for t in got["outputs"]] == ["scaled", "logits"]
        scaled, logits = got["outputs"]
        assert scaled["parameters"]["binary_data_size"] == 4 * 4 * 4
        raw = np.frombuffer(answer.content[length:], dtype="<f4").reshape(scaled["shape"])
        close(raw, expected["scaled"])
        close(np.reshape(logits["data"], logits["shape"]), expected["logits"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": "one"}, "\"inputs\" must be a list of 2 tensors ('a', 'b')"),
        ({"drop": "b"}, "\"inputs\" must be a list of 2 tensors ('a', 'b')"),
        ({"twice": "a"}, "input 'a' is sent twice"),
        ({"outputs": [{"name": "nope"}]}, "this model's outputs are ['logits', 'scaled']"),
        ({"outputs": [{"name": "logits"}, {"name": "logits"}]}, "asked for twice"),
        ({"short_b": True}, "input 'b': shape must be [n, 2, 2]"),
    ],
)
def test_v2_refuses_requests_that_do_not_fit_the_models_tensors(
    base: str, change: dict[str, Any], message: str
) -> None:
    a = {"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [0.0, 1.0, 2.0]}
    b = {"name": "b", "datatype": "FP32", "shape": [1, 2, 2], "data": [0.0] * 4}
    if change.get("short_b"):
        b = {**b, "shape": [1, 4]}
    inputs: Any = [a, b]
    if "inputs" in change:
        inputs = change["inputs"]
    if "drop" in change:
        inputs = [a]
    if "twice" in change:
        inputs = [a, a]
    request: dict[str, Any] = {"inputs": inputs}
    if "outputs" in change:
        request["outputs"] = change["outputs"]
    answer = httpx.post(f"{base}{INFER}", json=request)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_v2_binary_parts_must_add_up_to_what_follows_the_header(base: str) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [1, 3],
                 "parameters": {"binary_data_size": 12}},
                {"name": "b", "datatype": "FP32", "shape": [1, 2, 2],
                 "parameters": {"binary_data_size": 16}},
            ]
        }
    )  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header))}
    answer = httpx.post(f"{base}{INFER}", content=header + bytes(24), headers=headers)
    assert answer.status_code == 400
    assert "binary_data_size add up to 28 but 24 bytes follow" in answer.json()["error"]


def test_metadata_and_config_list_every_input_and_output(base: str) -> None:
    metadata = httpx.get(f"{base}/v2/models/pair").json()
    assert metadata["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "b", "datatype": "FP32", "shape": [-1, 2, 2]},
    ]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "scaled"]
    config = httpx.get(f"{base}/v2/models/pair/config").json()
    assert [i["dims"] for i in config["input"]] == [[3], [2, 2]]
    assert [o["dims"] for o in config["output"]] == [[4], [2, 2]]
    described = httpx.get(f"{base}/models/pair").json()["versions"][0]
    assert described["status"] == "ready"
    assert described["inputs"] == [{"name": "a", "shape": [3]}, {"name": "b", "shape": [2, 2]}]
    assert described["outputs"] == [
        {"name": "logits", "shape": [4]},
        {"name": "scaled", "shape": [2, 2]},
    ]


def test_concurrent_requests_share_batches_and_each_gets_its_own_inputs_answers(
    base: str,
) -> None:
    """Rows of every input stay together: were a's rows of one request put beside b's rows of
    another, the logits (which read both) would differ from each request's own."""
    requests = [pair_inputs(1 + i % 3, seed=100 + i) for i in range(24)]

    def post(client: httpx.AsyncClient, i: int, x: dict[str, np.ndarray]) -> Any:
        if i % 2:
            return client.post("/predict", json={"inputs": {k: v.tolist() for k, v in x.items()}})
        tensors = [
            {"name": k, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
            for k, v in reversed(x.items())
        ]
        return client.post(INFER, json={"inputs": tensors})

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await asyncio.gather(*(post(client, i, x) for i, x in enumerate(requests)))

    before = httpx.get(f"{base}/v2/models/pair/stats").json()["model_stats"][0]
    answers: list[dict[str, Any]] = []
    for i, response in enumerate(asyncio.run(send_all())):
        assert response.status_code == 200, response.text
        got = response.json()
        if i % 2 == 0:  # V2: the outputs as the predict answer names them
            got = {
                "outputs": {t["name"]: np.reshape(t["data"], t["shape"]) for t in got["outputs"]}
            }
        answers.append(got)
    for x, got in zip(requests, answers, strict=True):
        expected = pair_reference(x)
        close(got["outputs"]["logits"], expected["logits"])
        close(got["outputs"]["scaled"], expected["scaled"])
    after = httpx.get(f"{base}/v2/models/pair/stats").json()["model_stats"][0]
    batches = after["execution_count"] - before["execution_count"]
    assert batches < len(requests), "no two requests shared a batch: the test proves nothing"


def test_a_manifest_naming_one_tensor_twice_or_labelling_another_output_is_refused(
    pair_store: Path,
) -> None:
    manifest = read_manifest(pair_store / "pair" / "1")
    fields = manifest.model_dump()
    twice = {**fields, "inputs": [fields["inputs"][0], {**fields["inputs"][1], "name": "a"}]}
    with pytest.raises(ValueError, match="inputs must be at least one, each with its own name"):
        Manifest.model_validate(twice)
    relabelled = {**fields, "outputs": fields["outputs"][::-1], "labels": LABELS}
    with pytest.raises(ValueError, match="3 labels for 4 values of output 'scaled'"):
        Manifest.model_validate({**relabelled, "labels": LABELS[:3]})
    Manifest.model_validate(relabelled)  # 4 labels fit 'scaled' as well: its 2x2 values


def test_a_version_whose_manifest_names_tensors_the_graph_lacks_fails_to_load(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    version = add_pair_version(root)
    path = version / "manifest.json"
    fields = orjson.loads(path.read_bytes())
    fields["inputs"][1]["name"] = "c"
    path.write_bytes(orjson.dumps(fields))
    settings = Settings(model_store=root, default_model="pair")
    with running(create_app(settings)) as (url, _):
        described = httpx.get(f"{url}/models/pair").json()["versions"][0]
    assert described["status"] == "failed"
    assert "the manifest's inputs ['a', 'c'] are not the graph's ['a', 'b']" in described["reason"]


def test_torchscript_programs_take_inputs_by_position_and_give_tuples_or_dicts(
    tmp_path: Path,
) -> None:
    signature = Signature(
        packing((TensorSpec(name="a", shape=A_SHAPE), TensorSpec(name="b", shape=B_SHAPE))),
        packing((TensorSpec(name="total", shape=(1,)), TensorSpec(name="scaled", shape=B_SHAPE))),
    )
    x = pair_inputs(5, seed=9)
    total = x["a"].sum(axis=1, keepdims=True) + x["b"].reshape(5, -1).sum(axis=1, keepdims=True)
    rows = signature.inputs.pack([x["a"], x["b"]])
    for module in (AsTuple(), AsDict()):
        path = tmp_path / f"{type(module).__name__}.pt"
        torch.jit.save(torch.jit.script(module), str(path))
        backend = TorchScriptBackend(path, BackendOptions(device="cpu"), signature)
        total_got, scaled_got = signature.outputs.unpack(backend.run(rows))
        close(total_got, total)
        close(scaled_got, 3 * x["b"])
