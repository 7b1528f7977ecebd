"""Inputs of other dtypes than float32, as graphs declare them: uint8 pixels and int64 ids beside
each other, a float16 input; imported, served as such over /predict and V2, values that do not
fit the dtype refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

import foldserve
from service.app import create_app
from service.errors import FoldingError
from service.settings import Settings
from service.store import read_manifest
from tests.service.conftest import running


def _serialized(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _typed_graph() -> bytes:
    """pixels (uint8, 4) and ids (int64, 3) in; scores (3) out: pixels/255 @ W + sum of the
    ids' embedding rows."""
    rng = np.random.default_rng(5)
    weights = {
        "w": rng.normal(size=(4, 3)).astype(np.float32),
        "table": rng.normal(size=(8, 3)).astype(np.float32),
        "by255": np.asarray(1 / 255, dtype=np.float32),
        "axis": np.asarray([1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Cast", ["pixels"], ["pixels_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pixels_f", "by255"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "w"], ["from_pixels"]),
        helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        helper.make_node("ReduceSum", ["rows", "axis"], ["from_ids"], keepdims=0),
        helper.make_node("Add", ["from_pixels", "from_ids"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "typed",
        [
            helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["n", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 3]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return _serialized(graph)


def _floats_and_ids_graph(symbolic: bool = False) -> bytes:
    """x (float32, 3) and ids (int64, 2) in; x @ w + the sum of the ids' embedding rows out
    (``symbolic``: the graph leaves their sample dims unnamed sizes)."""
    rng = np.random.default_rng(6)
    weights = {
        "w": rng.normal(size=(3, 2)).astype(np.float32),
        "table": rng.normal(size=(8, 2)).astype(np.float32),
        "axis": np.asarray([1], dtype=np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["from_x"]),
        helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        helper.make_node("ReduceSum", ["rows", "axis"], ["from_ids"], keepdims=0),
        helper.make_node("Add", ["from_x", "from_ids"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "floats-and-ids",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "d" if symbolic else 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", "k" if symbolic else 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return _serialized(graph)


def _half_graph() -> bytes:
    """x (float16, 2) in; y = 2x (float16) out: a float16 file."""
    nodes = [helper.make_node("Add", ["x", "x"], ["y"])]  # float16 throughout, as such files are
    graph = helper.make_graph(
        nodes,
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 2])],
    )
    return _serialized(graph)


@pytest.fixture(scope="module")
def typed_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("typed")
    (root / "typed.onnx").write_bytes(_typed_graph())
    (root / "half.onnx").write_bytes(_half_graph())
    store = root / "store"
    typed = foldserve.import_onnx(root / "typed.onnx", store=store, name="typed")
    manifest = typed.build.manifest
    assert [(s.name, s.dtype) for s in manifest.inputs] == [("pixels", "uint8"), ("ids", "int64")]
    assert manifest.input_statistics is None  # pixels of a generated sample: no drift reference
    assert "uint8 0..255, integers 0..7" in (manifest.provenance.calibration or "")
    golden = np.asarray(manifest.golden.inputs)
    assert golden.shape[1] == 4 + 3 and (golden == np.round(golden)).all()
    half = foldserve.import_onnx(root / "half.onnx", store=store, name="half")
    assert half.build.manifest.inputs[0].dtype == "float16"
    assert half.build.manifest.outputs[0].dtype == "float32"
    assert half.build.manifest.provenance.dtype_conversion == (
        "outputs y: float16 -> float32 (answered FP32, values exact)"
    )
    return store


@pytest.fixture(scope="module")
def base(typed_store: Path) -> Iterator[str]:
    with running(create_app(Settings(model_store=typed_store, default_model="typed"))) as (url, _):
        yield url


def _reference(pixels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(_typed_graph(), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"pixels": pixels, "ids": ids})
    return np.asarray(scores)


def test_uint8_and_int64_inputs_are_served_as_such(base: str) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(3, 4)).astype(np.uint8)
    ids = rng.integers(0, 8, size=(3, 3)).astype(np.int64)
    expected = _reference(pixels, ids)
    body = {"inputs": {"pixels": pixels.tolist(), "ids": ids.tolist()}}
    answer = httpx.post(f"{base}/predict", json=body)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["outputs"], expected, rtol=1e-5, atol=1e-5)
    raw = pixels.tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "ids", "datatype": "INT64", "shape": [3, 3], "data": ids.ravel().tolist()},
                {"name": "pixels", "datatype": "UINT8", "shape": [3, 4],
                 "parameters": {"binary_data_size": len(raw)}},
            ]
        }
    )  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header))}
    answer = httpx.post(f"{base}/v2/models/typed/infer", content=header + raw, headers=headers)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    np.testing.assert_allclose(np.reshape(output["data"], (3, 3)), expected, atol=1e-5)
    metadata = httpx.get(f"{base}/v2/models/typed").json()
    assert [i["datatype"] for i in metadata["inputs"]] == ["UINT8", "INT64"]
    config = httpx.get(f"{base}/v2/models/typed/config").json()
    assert [i["data_type"] for i in config["input"]] == ["TYPE_UINT8", "TYPE_INT64"]


@pytest.mark.parametrize(
    ("pixels", "ids", "message"),
    [
        ([[0, 1, 2, 300]], [[0, 1, 2]], "input 'pixels' holds values outside uint8 (0 to 255)"),
        ([[0, 1, 2, -1]], [[0, 1, 2]], "input 'pixels' holds values outside uint8"),
        ([[0, 1, 2, 3]], [[0, 1.5, 2]], "input 'ids' takes integers (int64), got float64"),
    ],
)
def test_values_that_do_not_fit_an_inputs_dtype_are_refused(
    base: str, pixels: list[list[float]], ids: list[list[float]], message: str
) -> None:
    answer = httpx.post(f"{base}/predict", json={"inputs": {"pixels": pixels, "ids": ids}})
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_a_float16_input_takes_numbers_in_its_range(base: str) -> None:
    url = f"{base}/models/half/predict"
    answer = httpx.post(url, json={"inputs": [[1.5, -2.25]]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == [[3.0, -4.5]]
    answer = httpx.post(url, json={"inputs": [[70000.0, 0.0]]})
    assert answer.status_code == 400
    assert "holds values beyond float16" in answer.json()["error"]
    metadata = httpx.get(f"{base}/v2/models/half").json()
    assert metadata["inputs"][0]["datatype"] == "FP16"


def test_a_body_over_1_kb_of_integers_is_read_as_integers(base: str) -> None:
    """Past 1 kB the usual /predict body is read by a fast parser that makes floats."""
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(150, 4)).astype(np.uint8)
    ids = rng.integers(0, 8, size=(150, 3)).astype(np.int64)
    answer = httpx.post(
        f"{base}/predict", json={"inputs": {"pixels": pixels.tolist(), "ids": ids.tolist()}}
    )
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["outputs"], _reference(pixels, ids), atol=1e-5)
    half = np.full((150, 2), 0.5)
    answer = httpx.post(f"{base}/models/half/predict", json={"inputs": half.tolist()})
    assert answer.status_code == 200, answer.text


def test_int64s_minimum_is_beyond_float16(base: str) -> None:
    answer = httpx.post(f"{base}/models/half/predict", json={"inputs": [[-(2**63), 0]]})
    assert answer.status_code == 400
    assert "holds values beyond float16" in answer.json()["error"]


def test_calibration_data_of_floats_beside_ids_gives_the_floats_drift_reference(
    tmp_path: Path,
) -> None:
    (tmp_path / "mixed.onnx").write_bytes(_floats_and_ids_graph())
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(20, 3)) * 2 + 1).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, ids=rng.integers(0, 8, size=(20, 2)))
    result = foldserve.import_onnx(
        tmp_path / "mixed.onnx", store=tmp_path / "store", name="mixed",
        calibration=tmp_path / "data.npz",
    )  # fmt: skip
    statistics = result.build.manifest.input_statistics
    assert statistics is not None and statistics.layer == "input"
    np.testing.assert_allclose(statistics.mean, x.mean(axis=0), rtol=1e-5)


def test_image_preprocessing_is_refused_for_inputs_that_cannot_take_images(
    tmp_path: Path,
) -> None:
    (tmp_path / "typed.onnx").write_bytes(_typed_graph())
    with pytest.raises(FoldingError, match="images are the input of a model of one input"):
        foldserve.import_onnx(tmp_path / "typed.onnx", store=tmp_path, name="x", image_mean=[0.5])


def test_symbolic_sample_dims_of_several_inputs_are_given_by_name(tmp_path: Path) -> None:
    from foldserve import cli

    (tmp_path / "symbolic.onnx").write_bytes(_floats_and_ids_graph(symbolic=True))
    store = tmp_path / "store"
    argv = ["import", str(tmp_path / "symbolic.onnx"), "--store", str(store), "--name", "sym"]
    assert cli.main([*argv, "--input-shape", "3"]) == 1  # one shape for two inputs: refused
    assert cli.main([*argv, "--input-shape", "x=3", "--input-shape", "idz=2"]) == 1
    assert cli.main([*argv, "--input-shape", "x=3", "--input-shape", "ids=2"]) == 0
    manifest = read_manifest(store / "sym" / "1")
    assert [(s.name, s.dtype, s.shape) for s in manifest.inputs] == [
        ("x", "float32", (3,)),
        ("ids", "int64", (2,)),
    ]
