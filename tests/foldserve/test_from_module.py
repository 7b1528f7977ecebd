"""`foldserve export`: a user's own module, with or without data, into a verified version."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import foldserve
from foldserve import calibration, cli
from foldserve.from_module import load_module
from service.app import create_app
from service.backends import BackendOptions
from service.backends.onnx import OnnxBackend
from service.errors import FoldingError, VerificationError
from service.settings import Settings
from service.store import list_versions, read_manifest
from service.verify import check_files, verify_loaded_model
from tests.service.conftest import serve

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self, channels: int = 4, classes: int = 3) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(2, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(),
                nn.BatchNorm2d(channels),
            )
            self.head = nn.Linear(channels, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    def build(channels: int = 4, classes: int = 3) -> nn.Module:
        return SmallCNN(channels, classes)
    """
)


def _with_statistics(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """A few train-mode passes so every BN holds non-trivial running statistics."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, *shape, generator=generator) * 3 + 1)
    return model.eval()


def _onnx_outputs(version: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x.astype(np.float32)})[0])


def _served_checks_pass(version: Path) -> None:
    """What the server does before serving: files, no batch-statistics op, golden, invariance."""
    manifest = read_manifest(version)
    check_files(version, manifest)
    verify_loaded_model(manifest, OnnxBackend(version / "model.onnx", BackendOptions("cpu")))


@pytest.fixture
def user_code(tmp_path: Path) -> Path:
    path = tmp_path / "user_nets.py"
    path.write_text(USER_MODULE)
    return path


def test_cli_exports_a_users_module_and_checkpoint(
    user_code: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _with_statistics(load_module(f"{user_code}:build", {"channels": 6}), (2, 5, 5))
    checkpoint = tmp_path / "net.pt"
    torch.save(model.state_dict(), checkpoint)
    labels = tmp_path / "labels.txt"
    labels.write_text("ant\nbee\ncat\n")
    store = tmp_path / "store"
    argv = [
        "export",
        "--model",
        f"{user_code}:build",
        "--model-kwargs",
        '{"channels": 6}',
        "--checkpoint",
        str(checkpoint),
        "--input-shape",
        "2,5,5",
        "--store",
        str(store),
        "--name",
        "small-cnn",
        "--labels",
        str(labels),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"stored small-cnn version 1 at {store / 'small-cnn' / '1'}" in out
    version = store / "small-cnn" / "1"
    manifest = read_manifest(version)
    assert manifest.provenance.entry_point == "export"
    assert manifest.provenance.bn_stats == "ema"  # no data given: the running estimates
    assert manifest.provenance.calibration is not None
    assert manifest.provenance.calibration.startswith("generated")
    assert manifest.provenance.command.startswith("foldserve export --model")
    assert manifest.labels == ["ant", "bee", "cat"] and manifest.task == "classification"
    assert manifest.inputs[0].shape == (2, 5, 5) and manifest.outputs[0].shape == (3,)
    assert [bn.placement for bn in manifest.batch_norm] == ["folded_into_previous", "frozen_affine"]
    assert {f.format for f in manifest.files} == {"onnx", "torchscript"}
    assert manifest.verification.bitwise_batch_invariant is not None
    # The stored file computes the checkpoint's eval-mode function.
    x = np.random.default_rng(5).normal(size=(7, 2, 5, 5)).astype(np.float32) * 3
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_onnx_outputs(version, x), expected, rtol=1e-4, atol=1e-5)
    _served_checks_pass(version)


def test_population_statistics_come_from_the_calibration_file(tmp_path: Path) -> None:
    shape = (3, 6, 6)
    model = _with_statistics(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3)), shape)
    rng = np.random.default_rng(0)
    # Data far from what the running estimates saw: per-channel means 5, -2, 0 and scales 2, 1, 4.
    data = rng.normal(size=(300, *shape)) * np.array([2, 1, 4])[:, None, None]
    data = (data + np.array([5, -2, 0])[:, None, None]).astype(np.float32)
    np.save(tmp_path / "calibration.npy", data)

    result = foldserve.export(
        model,
        shape,
        store=tmp_path / "store",
        name="pop",
        calibration=tmp_path / "calibration.npy",
    )
    manifest = result.build.manifest
    assert manifest.provenance.bn_stats == "population"  # the default once data is given
    assert manifest.provenance.calibration_samples == 300
    (record,) = [bn for bn in manifest.batch_norm if bn.name == "0"]
    assert record.placement == "folded_into_next"  # input BN into an unpadded conv
    assert record.stats_shift is not None and record.stats_shift.max_mean_shift > 1.0
    # Reference: the same model with the BN's statistics set to the data's, by hand.
    by_hand = copy.deepcopy(model)
    by_hand[0].running_mean.copy_(torch.from_numpy(data.mean(axis=(0, 2, 3), dtype=np.float64)))
    by_hand[0].running_var.copy_(torch.from_numpy(data.var(axis=(0, 2, 3), dtype=np.float64)))
    with torch.no_grad():
        expected = by_hand(torch.from_numpy(data[:20])).numpy()
    np.testing.assert_allclose(_onnx_outputs(result.path, data[:20]), expected, atol=1e-4)
    # The golden samples are calibration samples, so the server checks on real inputs.
    golden = np.asarray(manifest.golden.inputs, dtype=np.float32).reshape(-1, *shape)
    np.testing.assert_array_equal(golden, data[: len(golden)])


def _regression_head(scale: float, tiny_var: bool = False) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    _with_statistics(model, (8,))
    with torch.no_grad():
        model[3].weight.mul_(scale)
        model[3].bias.fill_(scale)
        if tiny_var:  # normalizing by sqrt(1e-9) multiplies by ~3e4
            model[1].running_var.fill_(1e-9)
            model[1].eps = 1e-12
    return model


@pytest.mark.parametrize(("scale", "tiny_var"), [(1e4, False), (1.0, True)])
def test_a_regression_model_with_large_outputs_is_stored_and_passes_the_servers_checks(
    tmp_path: Path, scale: float, tiny_var: bool
) -> None:
    """An absolute-only bound called one float32 rounding of outputs near 10^4 a batch leak."""
    model = _regression_head(scale, tiny_var)
    result = foldserve.export(model, (8,), store=tmp_path, name="price")
    manifest = result.build.manifest
    assert manifest.task == "regression"
    # Rounding alone moved outputs by more than the old absolute bound of 1e-4 ...
    assert max(manifest.verification.max_abs_diff.values()) > 1e-4
    # ... yet by a small fraction of their scale.
    assert max(manifest.verification.max_rel_diff.values()) < manifest.verification.rtol
    x = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    outputs = _onnx_outputs(result.path, x)
    assert np.abs(outputs).max() > 100  # the outputs really are large
    _served_checks_pass(result.path)
    with serve(create_app(Settings(model_store=tmp_path, default_model="price"))) as base:
        models = httpx.get(f"{base}/models").json()["models"]
        answer = httpx.post(f"{base}/predict", json={"inputs": x[:5].tolist()})
    assert [v["status"] for m in models for v in m["versions"]] == ["ready"]
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["outputs"], outputs[:5], rtol=1e-6)


def test_a_model_using_batch_statistics_is_still_refused(tmp_path: Path) -> None:
    class CentresOnTheBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x - x.mean(dim=0, keepdim=True))

    with pytest.raises(VerificationError, match="shares a batch"):
        foldserve.export(CentresOnTheBatch(), (8,), store=tmp_path, name="leaky")
    assert list_versions(tmp_path, "leaky") == []

    untracked = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(FoldingError, match=r"'?1'? keep no running statistics"):
        foldserve.export(untracked, (8,), store=tmp_path, name="untracked")


@pytest.mark.parametrize("where", ["bn_forward", "bn_pre", "conv_forward"])
def test_hooks_are_refused_naming_the_module(tmp_path: Path, where: str) -> None:
    model = _with_statistics(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), (1, 5, 5))
    if where == "bn_forward":
        model[1].register_forward_hook(lambda _m, _i, out: out * 2)
    elif where == "bn_pre":
        model[1].register_forward_pre_hook(lambda _m, args: (args[0] + 1,))
    else:
        model[0].register_forward_hook(lambda _m, _i, out: out.relu())
    with pytest.raises(FoldingError, match=r"forward hooks on [01]: folding cannot keep"):
        foldserve.export(model, (1, 5, 5), store=tmp_path, name="hooked")


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "parametrized_weight_norm"])
def test_weight_and_spectral_norms_are_baked_in(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    if kind == "weight_norm":
        conv = nn.utils.weight_norm(conv)
    elif kind == "spectral_norm":
        conv = nn.utils.spectral_norm(conv)
    else:
        conv = nn.utils.parametrizations.weight_norm(conv)
    model = _with_statistics(nn.Sequential(conv, nn.BatchNorm2d(3)), (2, 6, 6))
    x = torch.randn(5, 2, 6, 6)
    with torch.no_grad():
        expected = model(x).numpy()
    result = foldserve.export(model, (2, 6, 6), store=tmp_path, name="normed")
    # Baked into a plain conv, the BN folds into it as usual.
    assert [bn.placement for bn in result.build.manifest.batch_norm] == ["folded_into_previous"]
    np.testing.assert_allclose(_onnx_outputs(result.path, x.numpy()), expected, atol=1e-5)
    assert nn.utils.parametrize.is_parametrized(model[0]) == (kind == "parametrized_weight_norm")
    with torch.no_grad():  # the caller's model is untouched and still computes the same
        np.testing.assert_allclose(model(x).numpy(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_non_float32_models_are_converted_and_the_conversion_checked(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    model = _with_statistics(
        nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)), (6,)
    ).to(dtype)
    result = foldserve.export(model, (6,), store=tmp_path, name="converted")
    conversion = result.build.manifest.provenance.dtype_conversion
    assert conversion is not None
    assert conversion.startswith(f"{str(dtype).removeprefix('torch.')} -> float32")
    assert next(model.parameters()).dtype == dtype  # the caller's model is untouched
    _served_checks_pass(result.path)


def test_integer_weights_are_refused_up_front(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    model.register_buffer("table", torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(FoldingError, match="complex64"):
        foldserve.export(model, (4,), store=tmp_path, name="complex")


class _SharedNorm(nn.Module):
    """One BatchNorm module applied at two places of the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(self.norm(x))))


def test_a_batch_norm_used_twice_keeps_running_statistics_or_is_refused(tmp_path: Path) -> None:
    model = _with_statistics(_SharedNorm(), (8,))
    calibration = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    with pytest.raises(FoldingError, match=r"norm \(2 calls\)"):
        foldserve.export(model, (8,), store=tmp_path, name="shared", calibration=calibration)
    # With the running estimates the eval-mode function is well defined: frozen at both sites.
    result = foldserve.export(
        model, (8,), store=tmp_path, name="shared", calibration=calibration, bn_stats="ema"
    )
    assert [bn.placement for bn in result.build.manifest.batch_norm] == ["frozen_affine"]
    with torch.no_grad():
        expected = model(torch.from_numpy(calibration)).numpy()
    np.testing.assert_allclose(_onnx_outputs(result.path, calibration), expected, atol=1e-5)


def test_cli_refusals_are_one_clear_line(
    user_code: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["export", "--store", str(tmp_path), "--name", "x", "--input-shape", "2,5,5"]
    assert cli.main([*base, "--model", f"{user_code}:nothing"]) == 1
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 3, 5, 5), dtype=np.float32))
    assert cli.main([*base, "--model", f"{user_code}:build", "--calibration", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "refused: x was not stored" in err and "expected (N, 2, 5, 5)" in err
    assert list_versions(tmp_path, "x") == []


def test_a_folder_of_images_calibrates_with_the_stated_normalization(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "images" / "class-a"
    folder.mkdir(parents=True)
    for i in range(6):
        pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    shape = (3, 6, 5)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    data = calibration.load(tmp_path / "images", shape, mean=mean, std=std)
    assert len(data.samples) == 6
    first = data.samples[:1][0]
    # Decoded by hand: resize to W x H, scale to [0, 1], then normalize per channel.
    with Image.open(folder / "0.png") as image:
        resized = np.asarray(image.resize((5, 6), Image.Resampling.BILINEAR), dtype=np.float32)
    by_hand = (resized.transpose(2, 0, 1) / 255 - np.array(mean)[:, None, None]) / np.array(std)[
        :, None, None
    ]
    np.testing.assert_allclose(first, by_hand, atol=1e-6)

    model = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), shape)
    result = foldserve.export(model, shape, store=tmp_path / "store", name="img", calibration=data)
    assert result.build.manifest.provenance.bn_stats == "population"
    assert result.build.manifest.provenance.calibration_samples == 6


def test_the_tolerance_follows_the_networks_own_float32_error() -> None:
    from foldserve.pipeline import MAX_RTOL, rtol_for
    from foldserve.tensors import float32_noise
    from foldserve.verify_export import RTOL

    assert rtol_for(0.0) == RTOL and rtol_for(1e-6) == RTOL
    assert rtol_for(5e-5) == 2e-4  # four times what float32 itself gets wrong
    assert rtol_for(1.0) == MAX_RTOL  # never past the manifest's bound
    torch.manual_seed(0)
    shallow = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    assert 0 < float32_noise(shallow, x) < 1e-6
    # 60 layers of width 64 with large weights: float32's own error grows with depth.
    layers: list[nn.Module] = []
    for _ in range(60):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    deep = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for layer in deep:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(3.0)
    wide = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    assert float32_noise(deep, wide) > 10 * float32_noise(shallow, x)


def test_a_float32_tensor_kept_as_a_plain_attribute_is_exported(tmp_path: Path) -> None:
    class Mixed(nn.Module):  # like MONAI GlobalNet's grid: not a buffer, so .double() skips it
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
            self.mix = torch.linspace(-1, 1, 16).reshape(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) @ self.mix  # a matmul refuses float64 @ float32

    model = _with_statistics(Mixed(), (6,))
    result = foldserve.export(model, (6,), store=tmp_path / "store", name="shifted")
    x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(result.path / "model.onnx"))
    (served,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=1e-5)


def test_a_model_returning_more_than_tensors_is_refused_with_advice(tmp_path: Path) -> None:
    """Several tensors are served (tests/foldserve/test_export_several_tensors.py); a value
    that is no tensor cannot be."""

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
            return self.body(x), 0.5

    with pytest.raises(FoldingError, match="output 'output1' is a float, not a tensor"):
        foldserve.export(_with_statistics(WithLoss(), (4,)), (4,), store=tmp_path, name="two")


def test_labels_that_do_not_fit_the_output_are_refused_before_the_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _with_statistics(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), (4,))

    def no_statistics(*_: object, **__: object) -> None:
        raise AssertionError("statistics computed before the labels were checked")

    monkeypatch.setattr("foldserve.from_module.set_population_statistics", no_statistics)
    data = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    with pytest.raises(FoldingError, match="2 labels for 3 outputs per sample"):
        foldserve.export(model, (4,), store=tmp_path, name="m", labels=["a", "b"], calibration=data)
    assert list_versions(tmp_path, "m") == []


def test_the_batch_checks_of_a_large_input_are_bounded_and_the_summary_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """3x160x160 (76,800 values): the server's batch sizes with fewer probes, and the bitwise
    check up to the batch size that fits 16M input values, not the whole row cap."""
    from foldserve.verify_export import bitwise_rows, invariance_plan

    shape = (3, 160, 160)
    assert invariance_plan(76_800, 54) == (5, (2, 7, 32))  # 5 probes, not 16
    assert invariance_plan(150_528, 27) == (11, (2, 7))  # 3x224x224: 11 probes, not 16
    assert invariance_plan(64, 512) == (16, (2, 7, 32))  # small inputs: as before
    module = textwrap.dedent(
        """
        from torch import nn

        def build():
            return nn.Sequential(
                nn.Conv2d(3, 4, 3, stride=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
            )
        """
    )
    (tmp_path / "wide.py").write_text(module)
    argv = ["export", "--model", f"{tmp_path / 'wide.py'}:build", "--input-shape", "3,160,160"]
    assert cli.main([*argv, "--store", str(tmp_path / "store"), "--name", "wide"]) == 0
    manifest = read_manifest(tmp_path / "store" / "wide" / "1")
    cap = manifest.batching.max_batch_size
    assert cap == 54  # 16 MiB of float32 rows
    rows = manifest.verification.bitwise_max_rows
    assert rows == bitwise_rows(np.zeros((8, *shape), np.float32), cap) == 20
    assert f"1..20 of the cap's {cap} rows: the check stops at 16.8M input values" in (
        capsys.readouterr().out
    )


def test_a_module_without_an_input_batch_norm_gets_the_calibration_datas_statistics(
    tmp_path: Path,
) -> None:
    model = _with_statistics(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), (4,))
    data = (np.random.default_rng(1).normal(size=(500, 4)) * [1, 2, 3, 4] + 7).astype(np.float32)
    result = foldserve.export(model, (4,), store=tmp_path, name="m", calibration=data)
    reference = result.build.manifest.input_statistics
    assert reference is not None and reference.source == "calibration"
    assert (reference.layer, reference.axis, reference.eps) == ("input", "feature", 0.0)
    np.testing.assert_allclose(reference.mean, data.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(reference.var, data.var(axis=0, dtype=np.float64), rtol=1e-6)
    # Generated inputs say nothing of real ones: no reference then.
    bare = foldserve.export(model, (4,), store=tmp_path, name="g")
    assert bare.build.manifest.input_statistics is None


def test_the_users_module_keeps_its_mode_and_statistics(tmp_path: Path) -> None:
    """The export copies a module only where it writes into it (population statistics), and
    puts a module it ran in eval mode back as it was."""
    model = _with_statistics(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (4,)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32) * 3 + 1
    foldserve.export(model, (4,), store=tmp_path, name="ema", bn_stats="ema")
    foldserve.export(model, (4,), store=tmp_path, name="pop", calibration=data)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
