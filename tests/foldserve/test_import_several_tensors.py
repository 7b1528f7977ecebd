"""``foldserve import`` of a graph with several named inputs and outputs: an image and its
metadata in, a classification and a segmentation out, BatchNorms on both paths; folded, verified,
stored and served, each output equal to the original's."""

from __future__ import annotations

import warnings
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import foldserve
from foldserve import cli
from service.app import create_app
from service.errors import FoldingError
from service.settings import Settings
from service.store import read_manifest
from tests.service.conftest import serve

IMAGE, META = (3, 6, 6), (5,)


class TwoHeads(nn.Module):
    """An image and its metadata in; class scores over both, and a mask of the image, out."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.meta = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 4), nn.BatchNorm1d(4))
        self.classify = nn.Linear(8, 3)
        self.mask = nn.Conv2d(4, 2, 1)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.features(image)
        pooled = features.mean(dim=(2, 3))
        scores = self.classify(torch.cat([pooled, self.meta(meta)], dim=1))
        return scores, self.mask(features)


def _network() -> nn.Module:
    torch.manual_seed(0)
    model = TwoHeads()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1.0, 0.5)
            bn.bias.normal_()
    return model.eval()


def _export(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated
        torch.onnx.export(
            _network(),
            (torch.randn(2, *IMAGE), torch.randn(2, *META)),
            path,
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["image", "meta"],
            output_names=["scores", "mask"],
            dynamic_axes={name: {0: "n"} for name in ("image", "meta", "scores", "mask")},
        )
    return path


def _inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, *IMAGE)).astype(np.float32),
        "meta": rng.normal(size=(n, *META)).astype(np.float32),
    }


def _original(path: Path, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(["scores", "mask"], session.run(["scores", "mask"], x), strict=True))


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("two-heads") / "two-heads.onnx")


def test_both_inputs_and_outputs_are_stored_folded_and_served_equal_to_the_original(
    original: Path, tmp_path: Path
) -> None:
    assert [n.op_type for n in onnx.load(original).graph.node].count("BatchNormalization") == 3
    store = tmp_path / "store"
    result = foldserve.import_onnx(original, store=store, name="two-heads", labels=["a", "b", "c"])
    manifest = result.build.manifest
    assert [(s.name, s.shape) for s in manifest.inputs] == [("image", IMAGE), ("meta", META)]
    assert [(s.name, s.shape) for s in manifest.outputs] == [("scores", (3,)), ("mask", (2, 6, 6))]
    assert manifest.task == "classification" and len(manifest.batch_norm) == 3
    stored = onnx.load(result.path / "model.onnx")
    assert "BatchNormalization" not in {node.op_type for node in stored.graph.node}
    # Drift watches the first input, the image, which meets a convolution first: without
    # calibration data it has no reference (meta's input BatchNorm describes another input).
    assert manifest.input_statistics is None

    x = _inputs(3, seed=1)
    expected = _original(original, x)
    settings = Settings(model_store=store, default_model="two-heads")
    with serve(create_app(settings)) as base:
        body = {"inputs": {name: values.tolist() for name, values in x.items()}}
        answer = httpx.post(f"{base}/predict", json=body)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    for name in ("scores", "mask"):
        np.testing.assert_allclose(got["outputs"][name], expected[name], rtol=1e-5, atol=1e-5)
    assert got["predictions"] == [["a", "b", "c"][i] for i in expected["scores"].argmax(axis=1)]


def test_calibration_data_for_several_inputs_is_an_npz_named_by_input(
    original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _inputs(40, seed=2)
    data["image"] = data["image"] * 2.0 + 3.0  # not N(0, 1): the drift reference must say so
    calibration = tmp_path / "data.npz"
    np.savez(calibration, **data)
    store = tmp_path / "store"
    code = cli.main(
        [
            *("import", str(original), "--store", str(store), "--name", "two-heads"),
            *("--calibration", str(calibration), "--calibration-limit", "30"),
        ]
    )
    assert code == 0
    manifest = read_manifest(store / "two-heads" / "1")
    assert "30 samples of inputs ['image', 'meta']" in (manifest.provenance.calibration or "")
    statistics = manifest.input_statistics
    assert statistics is not None and statistics.source == "calibration"
    assert statistics.axis == "channel" and len(statistics.mean) == 3  # the image's channels
    np.testing.assert_allclose(statistics.mean, data["image"][:30].mean(axis=(0, 2, 3)), rtol=1e-5)
    golden = np.asarray(manifest.golden.inputs[0], dtype=np.float32)
    first = np.concatenate([data["image"][0].ravel(), data["meta"][0].ravel()])
    np.testing.assert_array_equal(golden, first)  # the golden rows are the data's own
    assert "two-heads" in capsys.readouterr().out


def test_what_does_not_fit_several_inputs_is_refused_with_the_reason(
    original: Path, tmp_path: Path
) -> None:
    with pytest.raises(FoldingError, match="--input-shape gives one input's shape, but the graph"):
        foldserve.import_onnx(original, store=tmp_path, name="x", input_shape=(3, 6, 6))
    partial = tmp_path / "image-only.npz"
    np.savez(partial, image=_inputs(4, seed=3)["image"])
    with pytest.raises(FoldingError, match=r"has no array for inputs \['meta'\]"):
        foldserve.import_onnx(original, store=tmp_path, name="x", calibration=partial)
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, image=_inputs(4, seed=3)["image"], meta=_inputs(5, seed=3)["meta"])
    with pytest.raises(FoldingError, match="the inputs hold different numbers of samples"):
        foldserve.import_onnx(original, store=tmp_path, name="x", calibration=uneven)
