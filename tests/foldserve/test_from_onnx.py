"""`foldserve import`: an ONNX file exported by someone else into a verified, served version."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import foldserve
from foldserve import cli
from service.app import create_app
from service.errors import FoldingError
from service.packing import packing
from service.settings import Settings
from service.store import TensorSpec, list_versions, read_manifest
from tests.service.conftest import serve

SHAPE = (3, 8, 8)


def _with_statistics(model: nn.Module) -> nn.Module:
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in batch_norms:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1.0, 0.5)
            bn.bias.normal_()
    return model.eval()


def _legacy_export(model: nn.Module, path: Path, *, fixed_batch: int | None = None) -> Path:
    """Export as other tools do: the TorchScript-based exporter keeps every BatchNormalization."""
    dynamic = None if fixed_batch else {"image": {0: "n"}, "scores": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated
        torch.onnx.export(
            model,
            (torch.randn(fixed_batch or 2, *SHAPE),),
            path,
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["image"],
            output_names=["scores"],
            dynamic_axes=dynamic,
        )
    return path


def _network(outputs: int = 4) -> nn.Module:
    """Four output columns (classes), or one (a number per sample: regression)."""
    torch.manual_seed(0)
    return _with_statistics(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.BatchNorm2d(8),  # after an activation, before an unpadded conv: folded into it
            nn.Conv2d(8, 8, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, outputs),
        )
    )


def _original_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": x})[0])


def test_an_imported_onnx_file_is_folded_verified_stored_and_served(tmp_path: Path) -> None:
    original = _legacy_export(_network(), tmp_path / "their-net.onnx")
    assert [n.op_type for n in onnx.load(original).graph.node].count("BatchNormalization") == 2
    store = tmp_path / "store"
    result = foldserve.import_onnx(
        original, store=store, name="their-net", labels=["w", "x", "y", "z"]
    )
    manifest = result.build.manifest
    assert manifest.provenance.entry_point == "import"
    assert manifest.provenance.fold_path == "onnx"
    assert manifest.provenance.bn_stats == "as_imported"
    assert "sha256" in (manifest.provenance.source or "")
    assert [bn.placement for bn in manifest.batch_norm] == [
        "folded_into_previous",
        "folded_into_next",
    ]
    assert [f.format for f in manifest.files] == ["onnx"]
    assert (manifest.inputs[0].name, manifest.outputs[0].name) == ("image", "scores")
    assert manifest.verification.bitwise_batch_invariant is not None

    x = np.random.default_rng(3).normal(size=(5, *SHAPE)).astype(np.float32)
    expected = _original_outputs(original, x)
    with serve(create_app(Settings(model_store=store, default_model="their-net"))) as base:
        answer = httpx.post(f"{base}/predict", json={"inputs": x.tolist()}, timeout=30)
        v2 = httpx.post(
            f"{base}/v2/models/their-net/infer",
            json={
                "inputs": [
                    {
                        "name": "image",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ]
            },
            timeout=30,
        )
    assert answer.status_code == 200, answer.text
    served = np.asarray(answer.json()["outputs"], dtype=np.float32)
    assert np.abs(served - expected).max() <= 1e-4 * np.abs(expected).max()
    assert answer.json()["predictions"] == [["w", "x", "y", "z"][i] for i in expected.argmax(1)]
    assert v2.status_code == 200, v2.text
    (output,) = v2.json()["outputs"]
    assert output["name"] == "scores"
    np.testing.assert_allclose(np.asarray(output["data"]).reshape(5, 4), served, rtol=1e-6)


def test_a_fixed_batch_dimension_is_made_dynamic(tmp_path: Path) -> None:
    original = _legacy_export(_network(), tmp_path / "fixed.onnx", fixed_batch=1)
    dims = onnx.load(original).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1
    result = foldserve.import_onnx(original, store=tmp_path / "store", name="fixed")
    assert result.batch_made_dynamic
    assert "fixed batch dimension" in (result.build.folded.note or "")
    stored = onnx.load(result.path / "model.onnx").graph.input[0].type.tensor_type.shape.dim
    assert stored[0].dim_param and not stored[0].dim_value


def test_a_fixed_batch_baked_into_a_reshape_is_refused_with_re_export_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # x (1, 4) -> BN -> Reshape to (1, 2, 2): the constant shape hard-codes the batch of 1.
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Reshape", ["n", "shape"], ["y"], name="to_grid"),
    ]
    ones = np.ones(4, dtype=np.float32)
    initializers = [
        numpy_helper.from_array(ones, "s"),
        numpy_helper.from_array(ones * 0.5, "b"),
        numpy_helper.from_array(ones * 0.1, "m"),
        numpy_helper.from_array(ones * 2, "v"),
        numpy_helper.from_array(np.array([1, 2, 2], dtype=np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2])],
        initializers,
    )
    path = tmp_path / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    argv = ["import", str(path), "--store", str(tmp_path), "--name", "grid"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "refused: grid was not stored" in err and "re-export" in err
    assert list_versions(tmp_path, "grid") == []


def test_a_batch_norm_in_training_mode_is_refused_naming_the_node(tmp_path: Path) -> None:
    original = _legacy_export(_network(), tmp_path / "net.onnx")
    model = onnx.load(original)
    node = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    node.attribute.append(helper.make_attribute("training_mode", 1))
    onnx.save(model, tmp_path / "training.onnx")
    with pytest.raises(FoldingError, match=f"{node.name}.*training"):
        foldserve.import_onnx(tmp_path / "training.onnx", store=tmp_path, name="training")


def test_graphs_foldserve_cannot_serve_are_refused_up_front(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "f64", [x], [y])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "a.onnx"
    )
    with pytest.raises(FoldingError, match="DOUBLE; foldserve takes inputs of FLOAT, FLOAT16"):
        foldserve.import_onnx(tmp_path / "a.onnx", store=tmp_path, name="f64")
    (tmp_path / "b.onnx").write_bytes(b"not a model")
    with pytest.raises(FoldingError, match="not a readable ONNX file"):
        foldserve.import_onnx(tmp_path / "b.onnx", store=tmp_path, name="junk")


def test_cli_imports_with_calibration_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = _legacy_export(_network(), tmp_path / "net.onnx")
    data = np.random.default_rng(0).normal(size=(40, *SHAPE)).astype(np.float32)
    np.savez(tmp_path / "data.npz", images=data)
    argv = [
        "import",
        str(original),
        "--store",
        str(tmp_path / "store"),
        "--name",
        "net",
        "--calibration",
        str(tmp_path / "data.npz"),
    ]
    assert cli.main(argv) == 0
    assert "stored net version 1" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "store" / "net" / "1")
    assert manifest.provenance.calibration_samples == 40
    golden = np.asarray(manifest.golden.inputs, dtype=np.float32).reshape(-1, *SHAPE)
    np.testing.assert_array_equal(golden, data[: len(golden)])


def test_the_row_cap_is_chosen_proven_up_to_and_served(tmp_path: Path) -> None:
    original = _legacy_export(_network(), tmp_path / "net.onnx")
    store = tmp_path / "store"
    argv = ["import", str(original), "--store", str(store), "--name", "net"]
    assert cli.main([*argv, "--max-batch-size", "5"]) == 0
    manifest = read_manifest(store / "net" / "1")
    assert manifest.batching.max_batch_size == 5
    # What the export proved bit for bit is what the server will batch, no less.
    assert manifest.verification.bitwise_max_rows == 5
    x = np.random.default_rng(5).normal(size=(12, *SHAPE)).astype(np.float32)
    with serve(create_app(Settings(model_store=store, default_model="net"))) as base:
        (described,) = httpx.get(f"{base}/models/net", timeout=30).json()["versions"]
        # 12 rows run as batches of at most 5, and come back whole and in order.
        answer = httpx.post(f"{base}/predict", json={"inputs": x.tolist()}, timeout=30)
    assert described["batching"]["max_batch_size"] == 5
    # ... and the server measured the same bitwise invariance on its own runtime at load.
    assert described["bitwise_batch_invariance"]["measured"] is True
    assert described["bitwise_batch_invariance"]["max_rows"] == 5
    assert answer.status_code == 200, answer.text
    served = np.asarray(answer.json()["outputs"], dtype=np.float32)
    expected = _original_outputs(original, x)
    assert np.abs(served - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("rows", ["0", "5000"])
def test_a_row_cap_out_of_range_is_refused_before_any_work(
    tmp_path: Path, rows: str, capsys: pytest.CaptureFixture[str]
) -> None:
    original = _legacy_export(_network(), tmp_path / "net.onnx")
    argv = ["import", str(original), "--store", str(tmp_path), "--name", "net"]
    assert cli.main([*argv, "--max-batch-size", rows]) == 1
    assert f"max_batch_size={rows}: must be 1 to 4096" in capsys.readouterr().err
    assert list_versions(tmp_path, "net") == []


def test_one_output_column_without_labels_is_served_as_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = _legacy_export(_network(outputs=1), tmp_path / "reg.onnx")
    store = tmp_path / "store"
    assert cli.main(["import", str(original), "--store", str(store), "--name", "reg"]) == 0
    assert "regression (1 value per sample, no predictions)" in capsys.readouterr().out
    assert read_manifest(store / "reg" / "1").task == "regression"
    x = np.random.default_rng(4).normal(size=(3, *SHAPE)).astype(np.float32)
    with serve(create_app(Settings(model_store=store, default_model="reg"))) as base:
        answer = httpx.post(f"{base}/predict", json={"inputs": x.tolist()}, timeout=30).json()
    # The values themselves, not the arg-max of one column (always 0).
    assert answer["predictions"] is None
    expected = _original_outputs(original, x)
    np.testing.assert_allclose(np.asarray(answer["outputs"]), expected, rtol=1e-4, atol=1e-5)


def test_labels_inline_or_from_a_file_and_the_summary_says_the_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = _legacy_export(_network(), tmp_path / "net.onnx")
    store = tmp_path / "store"
    argv = ["import", str(original), "--store", str(store), "--name", "net"]
    assert cli.main([*argv, "--labels", '["w", "x", "y", "z"]']) == 0
    assert "classification (4 labels)" in capsys.readouterr().out
    (tmp_path / "labels.txt").write_text("a\nb\n\nc\nd\n")
    assert cli.main([*argv, "--labels", str(tmp_path / "labels.txt")]) == 0
    assert read_manifest(store / "net" / "1").labels == ["w", "x", "y", "z"]
    assert read_manifest(store / "net" / "2").labels == ["a", "b", "c", "d"]
    assert cli.main(argv) == 0  # no labels, four columns: classes named by their index
    assert "4 columns, no labels: predictions are column indices" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("missing.txt", "cannot read labels file 'missing.txt'"),
        ('["a", "b"', "the JSON list given: not a JSON list"),
        ('["a", "a", "b", "c"]', "labels given more than once: ['a']"),
        ("[]", "the JSON list given: holds no labels"),
    ],
)
def test_a_bad_labels_argument_is_one_line_before_any_work(
    tmp_path: Path, labels: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    original = tmp_path / "never-read.onnx"  # argument errors come before the file is opened
    argv = ["import", str(original), "--store", str(tmp_path), "--name", "net"]
    with pytest.raises(SystemExit) as stopped:
        cli.main([*argv, "--labels", labels])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_labels_that_do_not_fit_the_outputs_are_refused_before_the_fold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = _legacy_export(_network(), tmp_path / "net.onnx")

    def no_fold(*_: object) -> None:
        raise AssertionError("folded before the labels were checked")

    monkeypatch.setattr("foldserve.from_onnx.fold_onnx_batch_norms", no_fold)
    argv = ["import", str(original), "--store", str(tmp_path), "--name", "net"]
    assert cli.main([*argv, "--labels", '["a", "b", "c"]']) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "refused: net was not stored: 3 labels for 4 outputs per sample: give one label per "
        "output column, or none"
    )
    assert list_versions(tmp_path, "net") == []


def _token_concat_model(producer: str) -> onnx.ModelProto:
    """x (1, 4) -> Concat with a constant (1, 4) token on axis 1 -> BN -> MatMul: the token was
    expanded to the export's batch of 1, so no other batch size runs (as a ViT's class token)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Concat", ["token", "x"], ["joined"], name="join_token", axis=1),
        helper.make_node("BatchNormalization", ["joined", "s", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("MatMul", ["n", "w"], ["y"], name="head"),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((1, 4)).astype(np.float32), "token"),
        numpy_helper.from_array(np.ones(8, dtype=np.float32), "s"),
        numpy_helper.from_array(np.zeros(8, dtype=np.float32), "b"),
        numpy_helper.from_array(np.zeros(8, dtype=np.float32), "m"),
        numpy_helper.from_array(np.ones(8, dtype=np.float32), "v"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "token",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.producer_name = producer
    return model


@pytest.mark.parametrize(
    ("producer", "advice"),
    [
        ("tf2onnx", "leave the batch out of the Keras Input"),
        ("pytorch", "dynamic_axes={'x': {0: 'batch'}}"),
        ("paddle2onnx", "paddle.static.InputSpec(shape=[None, ...])"),
        ("", "re-export with a dynamic (symbolic) batch dimension"),
    ],
)
def test_a_batch_baked_in_past_the_inputs_is_one_clear_refusal_with_the_exporters_advice(
    tmp_path: Path, producer: str, advice: str, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "token.onnx"
    onnx.save(_token_concat_model(producer), path)
    argv = ["import", str(path), "--store", str(tmp_path), "--name", "token"]
    assert cli.main(argv) == 1
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line: no onnxruntime log line of its own
    assert lines[0].startswith("refused: token was not stored: ")
    assert "hard-codes its batch size" in lines[0] and advice in lines[0]
    assert list_versions(tmp_path, "token") == []


def test_a_batch_that_only_running_reveals_is_refused_as_such(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Where shape inference learns nothing, running the graph on several samples does."""
    from foldserve.from_onnx import _run

    model = _token_concat_model("tf2onnx")
    for value_info in (model.graph.input[0], model.graph.output[0]):
        value_info.type.tensor_type.shape.dim[0].dim_param = "batch"  # as make_batch_dynamic
    x = np.zeros((16, 4), dtype=np.float32)
    with pytest.raises(FoldingError) as refused:
        inputs = packing((TensorSpec(name="x", shape=x.shape[1:]),))
        _run(model, x, inputs, [model.graph.output[0].name], made_dynamic=True)
    message = refused.value.message
    assert message.startswith("the graph hard-codes its batch size past its inputs: ONNX Runtime")
    assert "on 16 samples at once" in message and "join_token" in message
    assert "tf2onnx --inputs x[-1,...]" in message
    assert capfd.readouterr().err == ""  # onnxruntime's own log line is not printed


def test_without_an_input_batch_norm_drift_is_measured_against_the_calibration_data(
    tmp_path: Path,
) -> None:
    """The graph's first BN reads a conv's output: the drift reference is the data's own
    per-channel mean and variance, and the manifest says so."""
    original = _legacy_export(_network(), tmp_path / "net.onnx")
    rng = np.random.default_rng(2)
    offsets = np.array([0.0, 5.0, -3.0], dtype=np.float32)[None, :, None, None]
    data = (rng.normal(size=(300, *SHAPE)) * [[[[1.0]], [[2.0]], [[0.5]]]] + offsets).astype(
        np.float32
    )
    store = tmp_path / "store"
    result = foldserve.import_onnx(original, store=store, name="net", calibration=data)
    reference = result.build.manifest.input_statistics
    assert reference is not None
    assert (reference.layer, reference.axis, reference.source) == (
        "input",
        "channel",
        "calibration",
    )
    np.testing.assert_allclose(reference.mean, data.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reference.var, data.var(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    # Served: inputs like the data score low, inputs shifted by two of their deviations high.
    shifted = data[:200] + 2 * np.array([1.0, 2.0, 0.5], dtype=np.float32)[None, :, None, None]
    for rows, low in ((data[:200], True), (shifted, False)):
        with serve(create_app(Settings(model_store=store, default_model="net"))) as base:
            answer = httpx.post(f"{base}/predict", json={"inputs": rows.tolist()}, timeout=30)
            assert answer.status_code == 200, answer.text
            drift = _drift_after(base, len(rows))
        assert drift["available"] and drift["layer"] == "input"
        assert drift["score"] < 0.2 if low else drift["score"] > 1.0, drift


def _drift_after(base: str, samples: int) -> dict[str, Any]:
    """The drift report once the server has folded in the latest ``samples`` rows."""
    import time

    deadline = time.monotonic() + 10
    while True:
        drift = httpx.get(f"{base}/models/net/drift", timeout=30).json()
        if drift.get("samples", 0) >= samples or time.monotonic() > deadline:
            return dict(drift)
        time.sleep(0.05)
