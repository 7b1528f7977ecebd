"""Hidden BatchNorms watched through a map of the input: the monitor against torch itself, the
shipped models' verdicts, the side file's checks, and manifests written before the field."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import foldserve
from foldserve.demos.data import load_dataset
from service.drift import CPU_BUDGET, DEFAULT_THRESHOLD, DriftMonitor
from service.drift_budget import BURST_S
from service.drift_layer import HiddenLayer
from service.drift_thread import FoldThread
from service.errors import VerificationError
from service.monitor_maps import MAX_WEIGHTS, Conv2dMap
from service.store import HiddenStatistics, InputStatistics, Manifest, SideFile, read_manifest
from service.verify import check_files

SHIPPED = Path(__file__).resolve().parents[2] / "model_store"


class Net(nn.Module):
    """[input BN] -> first layer -> hidden BN -> ReLU -> flatten -> Linear."""

    def __init__(self, first: nn.Module, hidden: nn.Module, input_bn: nn.Module) -> None:
        super().__init__()
        self.scaler, self.first, self.bn = input_bn, first, hidden
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.bn(self.first(self.scaler(x))))
        return out


def _data(shape: tuple[int, ...], n: int = 600) -> np.ndarray:
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 4.0, size=shape[:1]).reshape((-1,) + (1,) * (len(shape) - 1))
    offset = np.arange(shape[0]).reshape(scale.shape) * 3.0
    return (rng.normal(size=(n, *shape)) * scale + offset).astype(np.float32)


def _torch_bn_input(model: nn.Module, layer: str, x: np.ndarray) -> np.ndarray:
    """What the eval-mode module feeds its hidden BN, seen by a forward hook."""
    seen: list[torch.Tensor] = []
    bn = dict(model.named_modules())[layer]
    handle = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(x))
    finally:
        handle.remove()
    return seen[0].double().numpy()


CASES = {
    # (first layer, hidden BN, sample shape, with an input BN)
    "linear": (lambda: nn.Linear(6, 8), lambda: nn.BatchNorm1d(8), (6,), True),
    "linear-raw": (lambda: nn.Linear(6, 8), lambda: nn.BatchNorm1d(8), (6,), False),
    "conv": (
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1),  # padding: the pad value matters
        lambda: nn.BatchNorm2d(4),
        (2, 7, 7),
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_hidden_monitor_sees_what_torch_feeds_the_bn(tmp_path: Path, case: str) -> None:
    make_first, make_bn, shape, input_bn = CASES[case]
    torch.manual_seed(0)
    norm: nn.Module = (nn.BatchNorm1d if len(shape) == 1 else nn.BatchNorm2d)(shape[0])
    model = Net(make_first(), make_bn(), norm if input_bn else nn.Identity())
    data = _data(shape)
    with torch.no_grad():  # train mode: running statistics near the data's, and the head made
        model.train()(torch.from_numpy(data))
    # ema: the module's own statistics, so torch below runs exactly the exported model.
    result = foldserve.export(
        model, shape, store=tmp_path, name="net", calibration=data, bn_stats="ema"
    )
    manifest = result.build.manifest
    (hidden,) = manifest.hidden_statistics
    assert (hidden.layer, hidden.map_from) == ("bn", "first")
    assert hidden.through == ("scaler" if input_bn else None)
    assert hidden.map == ("linear" if len(shape) == 1 else "conv2d")
    assert (result.path / hidden.file.path).stat().st_size == hidden.file.size_bytes < 1 << 20

    live = _data(shape, 400) * 1.1 + 0.5  # other data than the calibration set
    inputs = _torch_bn_input(model, "bn", live)
    axes = (0,) if inputs.ndim == 2 else (0, 2, 3)
    assert hidden.mean == pytest.approx(model.bn.running_mean.double().tolist())

    loaded = DriftMonitor.for_manifest(manifest, directory=result.path)  # maps read from files
    # No decay to speak of and every row folded: the moments are the plain ones.
    exact = DriftMonitor(
        manifest.input_statistics, hidden=loaded.hidden, window=10**12, budget=None
    )
    exact.observe(live)
    assert exact.flush()
    (report,) = exact.report().hidden
    assert report.samples == pytest.approx(len(live), rel=1e-6)
    np.testing.assert_allclose(
        [f.live_mean for f in report.features], inputs.mean(axes), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        [f.live_var for f in report.features], inputs.var(axes), rtol=1e-3, atol=1e-4
    )
    # And the score is the docstring's, on the hidden BN's own statistics.
    mean, var = np.array(hidden.mean), np.array(hidden.var)
    floor = max(hidden.eps, 0.01 * var.mean())
    shift = np.abs(inputs.mean(axes) - mean) / np.sqrt(var + floor)
    ratio = np.abs(np.log((inputs.var(axes) + floor) / (var + floor)))
    assert report.score == pytest.approx(shift.mean() + ratio.mean(), rel=1e-3)


def test_a_map_too_large_is_skipped_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    wide = MAX_WEIGHTS // 6 + 1  # 6 inputs: one weight too many
    model = Net(nn.Linear(6, wide), nn.BatchNorm1d(wide), nn.BatchNorm1d(6))
    data = _data((6,), 200)
    model(torch.from_numpy(data[:4]))  # makes the lazy head
    with caplog.at_level(logging.WARNING):
        result = foldserve.export(model, (6,), store=tmp_path, name="wide", calibration=data)
    assert result.build.manifest.hidden_statistics == ()
    assert "bn is not monitored for drift" in caplog.text and "weights" in caplog.text
    assert not list(result.path.glob("monitor-*"))


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return load_dataset("digits", (64,)).x_test.astype(np.float32)


def _monitor(name: str) -> DriftMonitor:
    directory = SHIPPED / name / "1"
    return DriftMonitor.for_manifest(read_manifest(directory), directory=directory)


@pytest.mark.parametrize(
    ("name", "layer", "kind"),
    [("digits-mlp", "body.1", "linear"), ("digits-cnn", "stem.1", "conv2d")],
)
def test_the_shipped_models_watch_their_first_hidden_bn(
    held_out: np.ndarray, name: str, layer: str, kind: str
) -> None:
    shape = (-1, 64) if name == "digits-mlp" else (-1, 1, 8, 8)
    calm, moved = _monitor(name), _monitor(name)
    for start in range(0, len(held_out), 7):
        calm.observe(held_out[start : start + 7].reshape(shape))
        moved.observe((held_out[start : start + 7] * 1.5 + 1.0).reshape(shape))
    assert calm.flush() and moved.flush()
    (quiet,) = calm.report().hidden
    (loud,) = moved.report().hidden
    assert (quiet.layer, quiet.map) == (layer, kind)
    assert quiet.score is not None and quiet.score < DEFAULT_THRESHOLD / 3 and not quiet.drifted
    assert loud.score is not None and loud.score > 2 * DEFAULT_THRESHOLD and loud.drifted
    assert calm.latest_hidden == ((layer, quiet.score, quiet.samples),)
    assert quiet.samples_folded == len(held_out)  # a cheap map: every row


def test_a_tampered_side_file_fails_verification(tmp_path: Path) -> None:
    version = tmp_path / "digits-mlp" / "1"
    shutil.copytree(SHIPPED / "digits-mlp" / "1", version)
    manifest = read_manifest(version)
    check_files(version, manifest)
    side = version / "monitor-body.1.npz"
    content = bytearray(side.read_bytes())
    content[-40] ^= 1
    side.write_bytes(bytes(content))
    with pytest.raises(VerificationError, match=r"monitor-body\.1\.npz: sha256 .* does not match"):
        check_files(version, manifest)
    with pytest.raises(VerificationError, match=r"monitor-body\.1\.npz: sha256"):
        DriftMonitor.for_manifest(manifest, directory=version)
    side.unlink()
    with pytest.raises(VerificationError, match=r"monitor-body\.1\.npz: file listed .* missing"):
        check_files(version, manifest)


def test_manifests_written_before_the_field_still_load() -> None:
    raw = json.loads((SHIPPED / "digits-mlp" / "1" / "manifest.json").read_text())
    del raw["hidden_statistics"]
    old = Manifest.model_validate(raw)
    assert old.hidden_statistics == () and old.checked_files() == old.files
    monitor = DriftMonitor.for_manifest(old, directory=SHIPPED / "digits-mlp" / "1")
    assert monitor.available and monitor.report().hidden == []


def test_a_side_file_must_fit_the_manifest() -> None:
    raw = json.loads((SHIPPED / "digits-mlp" / "1" / "manifest.json").read_text())
    raw["hidden_statistics"][0]["file"]["path"] = "model.onnx"
    with pytest.raises(ValueError, match="share one path"):
        Manifest.model_validate(raw)
    raw = json.loads((SHIPPED / "digits-mlp" / "1" / "manifest.json").read_text())
    raw["hidden_statistics"][0]["map"] = "conv2d"
    with pytest.raises(ValueError, match="do not fit inputs"):
        Manifest.model_validate(raw)


def _resnet50_stem() -> tuple[InputStatistics, HiddenLayer]:
    """ResNet-50's first layers at 3 x 224 x 224: an input BN, then a 7 x 7 stride-2 convolution
    to 64 channels over 112 x 112 positions (9,408 weights, "cheap" by MAX_WEIGHTS; 118 M
    multiply-adds an image), then the BN it feeds."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0.0, 0.05, (64, 3, 7, 7)).astype(np.float32)
    stem = Conv2dMap(
        weight=np.ascontiguousarray(weight.reshape(64, -1).T),
        bias=np.zeros(64, np.float32),
        pad_value=np.zeros(3, np.float32),
        kernel=(7, 7),
        stride=(2, 2),
        padding=(3, 3),
        input_shape=(3, 224, 224),
    )
    channels = {"axis": "channel", "source": "ema", "eps": 1e-5}
    statistics = HiddenStatistics(
        layer="bn1", map="conv2d", map_from="conv1", through="input_norm", stride=(2, 2),
        padding=(3, 3), file=SideFile(path="monitor-bn1.npz", sha256="0" * 64, size_bytes=1),
        mean=(0.0,) * 64, var=(0.5,) * 64, **channels,
    )  # fmt: skip
    inputs = InputStatistics(layer="input_norm", mean=(0.0,) * 3, var=(1.0,) * 3, **channels)
    return inputs, HiddenLayer(statistics, stem)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_an_expensive_map_is_sampled_within_the_cpu_budget() -> None:
    """Issue 17: the monitor ran ResNet-50's stem on every image, on the event loop, and halved
    the server's images/s. Now its cost is bounded by the budget, whatever the traffic."""
    inputs, stem = _resnet50_stem()
    thread = FoldThread("test-resnet-stem")  # its own: its CPU clock is this monitor's alone
    monitor = DriftMonitor(inputs, hidden=[stem], thread=thread)
    images = np.random.default_rng(1).normal(size=(4, 1, 3, 224, 224)).astype(np.float32)
    started = time.monotonic()
    while time.monotonic() - started < 2.0:  # 50 images/s, as a server would observe them
        for image in images:
            monitor.observe(image)
            time.sleep(0.02)
    assert monitor.flush()
    elapsed = time.monotonic() - started
    cpu = int(Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text().split()[0]) / 1e9
    report = monitor.report()
    (hidden,) = report.hidden
    observed = report.samples_observed
    assert observed >= 80 and report.samples_folded <= observed
    # Sampled, and said: the stem holds a few images, the input BN (cheaper) more.
    assert 1 <= hidden.samples_folded < report.samples_folded
    assert hidden.samples == pytest.approx(
        sum((1 - 1 / 2000) ** k for k in range(hidden.samples_folded))
    )
    assert hidden.score is not None and report.cpu_budget == CPU_BUDGET
    # At most the budget, the credit saved at the start, and a row or two past the credit
    # (a stem image costs about 10 ms here); every image would have cost ten times that.
    assert cpu < CPU_BUDGET * (elapsed + BURST_S) + 0.06, (cpu, hidden.samples_folded)
