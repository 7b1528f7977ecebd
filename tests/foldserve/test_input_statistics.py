"""The input BatchNorm's frozen statistics reach the manifest (for drift), whatever the path."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import foldserve
from foldserve.demos.data import load_dataset
from service.store import InputStatistics, read_manifest

SHIPPED = Path(__file__).resolve().parents[2] / "model_store"


class InputNormed(nn.Module):
    """(n, 6) -> BN on the input itself -> Linear -> BN -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.scaler = nn.BatchNorm1d(6)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(self.scaler(x))
        return out


def _features(n: int = 512) -> np.ndarray:
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 2.0, 0.5, 10.0, 3.0, 0.1])
    return (rng.normal(size=(n, 6)) * scale + np.arange(6) * 5).astype(np.float32)


def test_population_statistics_of_the_input_bn_are_recorded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = _features()
    result = foldserve.export(InputNormed(), (6,), store=tmp_path, name="normed", calibration=data)
    stats = result.build.manifest.input_statistics
    assert stats is not None
    assert (stats.layer, stats.axis, stats.source) == ("scaler", "feature", "population")
    np.testing.assert_allclose(stats.mean, data.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.var, data.astype(np.float64).var(0), rtol=1e-4)
    assert stats.eps == pytest.approx(1e-5)
    # Written and read back through the store's one schema.
    assert read_manifest(result.path).input_statistics == stats


def test_running_statistics_of_an_image_input_bn_are_recorded_per_channel(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)
    ).eval()
    with torch.no_grad():
        model[0].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model[0].running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
    result = foldserve.export(model, (3, 8, 8), store=tmp_path, name="img", bn_stats="ema")
    stats = result.build.manifest.input_statistics
    assert stats is not None
    assert (stats.layer, stats.axis, stats.source) == ("0", "channel", "ema")
    assert stats.mean == pytest.approx((0.5, -1.0, 2.0))
    assert stats.var == pytest.approx((0.25, 4.0, 1.0))


def test_a_model_without_an_input_bn_records_its_calibration_datas_statistics(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    # The first BN reads the Linear's output, not the input: the data is the only reference.
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    data = _features()
    result = foldserve.export(model, (6,), store=tmp_path, name="plain", calibration=data)
    reference = result.build.manifest.input_statistics
    assert reference is not None and (reference.layer, reference.source) == ("input", "calibration")
    np.testing.assert_allclose(reference.mean, np.asarray(data).mean(axis=0), rtol=1e-6, atol=1e-9)
    # Without data (generated inputs) there is nothing to compare inputs with.
    bare = foldserve.export(model, (6,), store=tmp_path, name="bare")
    assert bare.build.manifest.input_statistics is None


def _legacy_onnx(model: nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated
        torch.onnx.export(
            model.eval(),
            (torch.randn(2, *shape),),
            path,
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )
    return path


def test_an_imported_onnx_file_records_its_input_batch_normalization(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = InputNormed().eval()
    with torch.no_grad():
        model.scaler.running_mean.copy_(torch.arange(6.0))
        model.scaler.running_var.copy_(torch.linspace(0.5, 3.0, 6))
    path = _legacy_onnx(model, tmp_path / "theirs.onnx", (6,))
    result = foldserve.import_onnx(path, store=tmp_path / "store", name="theirs")
    stats = result.build.manifest.input_statistics
    assert stats is not None
    assert (stats.axis, stats.source) == ("feature", "as_imported")
    assert stats.mean == pytest.approx(tuple(range(6)))
    assert stats.var == pytest.approx(tuple(np.linspace(0.5, 3.0, 6)), rel=1e-6)

    plain = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    path = _legacy_onnx(plain, tmp_path / "plain.onnx", (6,))
    imported = foldserve.import_onnx(path, store=tmp_path / "store", name="plain")
    assert imported.build.manifest.input_statistics is None


def test_statistics_that_do_not_fit_the_input_are_refused() -> None:
    stats = InputStatistics(
        layer="bn", axis="channel", source="ema", mean=(0.0, 1.0), var=(1.0, 1.0), eps=1e-5
    )
    stats.check_fits((2, 8, 8))
    for shape in ((3, 8, 8), (2,)):
        with pytest.raises(ValueError, match="do not fit"):
            stats.check_fits(shape)
    with pytest.raises(ValidationError, match="variances"):
        InputStatistics(
            layer="bn", axis="feature", source="ema", mean=(0.0,), var=(1.0, 2.0), eps=0
        )
    with pytest.raises(ValidationError, match="finite"):
        InputStatistics(layer="bn", axis="feature", source="ema", mean=(0.0,), var=(-1.0,), eps=0)


def test_the_shipped_models_carry_their_training_statistics() -> None:
    mlp = read_manifest(SHIPPED / "digits-mlp" / "1").input_statistics
    cnn = read_manifest(SHIPPED / "digits-cnn" / "1").input_statistics
    assert mlp is not None and cnn is not None
    assert (mlp.layer, mlp.axis, mlp.source, len(mlp.mean)) == (
        "input_norm",
        "feature",
        "population",
        64,
    )
    assert (cnn.layer, cnn.axis, cnn.source, len(cnn.mean)) == (
        "input_norm",
        "channel",
        "population",
        1,
    )
    # Population statistics: exactly the training split's per-pixel mean and variance.
    train = load_dataset("digits", (64,)).x_train.astype(np.float64)
    np.testing.assert_allclose(mlp.mean, train.mean(0), atol=1e-5)
    np.testing.assert_allclose(mlp.var, train.var(0), rtol=1e-4, atol=1e-5)
    assert cnn.mean[0] == pytest.approx(train.mean(), rel=1e-5)


def test_the_shipped_models_name_their_monitored_hidden_layers() -> None:
    """The first hidden BN of each, right after a layer reading the input BN's output."""
    mlp = read_manifest(SHIPPED / "digits-mlp" / "1").hidden_statistics
    cnn = read_manifest(SHIPPED / "digits-cnn" / "1").hidden_statistics
    described = [
        (h.layer, h.map, h.map_from, h.through, h.axis, h.source, len(h.mean), h.file.path)
        for h in (*mlp, *cnn)
    ]
    assert described == [
        ("body.1", "linear", "body.0", "input_norm", "feature", "population", 128,
         "monitor-body.1.npz"),
        ("stem.1", "conv2d", "stem.0", "input_norm", "channel", "population", 32,
         "monitor-stem.1.npz"),
    ]  # fmt: skip
    for name, hidden in (("digits-mlp", mlp[0]), ("digits-cnn", cnn[0])):
        path = SHIPPED / name / "1" / hidden.file.path
        assert path.stat().st_size == hidden.file.size_bytes < 64 << 10
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hidden.file.sha256


def test_an_imported_onnx_file_monitors_no_hidden_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = _legacy_onnx(InputNormed().eval(), tmp_path / "theirs.onnx", (6,))
    result = foldserve.import_onnx(path, store=tmp_path / "store", name="theirs")
    assert result.build.manifest.hidden_statistics == ()  # documented: torch modules only


def test_exported_modules_record_their_hidden_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = foldserve.export(
        InputNormed(), (6,), store=tmp_path, name="n", calibration=_features()
    )
    (hidden,) = result.build.manifest.hidden_statistics
    assert (hidden.layer, hidden.map_from, hidden.through) == ("body.1", "body.0", "scaler")
    assert read_manifest(result.path).hidden_statistics == (hidden,)
