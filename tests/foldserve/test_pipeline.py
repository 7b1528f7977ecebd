from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import service.store
from foldserve import cli, fold
from foldserve.demos import build
from foldserve.demos.build import PipelineResult
from foldserve.demos.data import Dataset
from foldserve.demos.train import TrainConfig
from foldserve.fold import FoldResult
from service.backends import BackendOptions
from service.backends.onnx import OnnxBackend
from service.backends.torchscript import TorchScriptBackend
from service.errors import VerificationError
from service.store import Manifest, list_versions, read_manifest, sha256_file
from service.verify import check_files, verify_loaded_model

from .conftest import TINY_EPOCHS

Stored = tuple[PipelineResult, PipelineResult]
CONFIG = TrainConfig(arch="digits-mlp", epochs=TINY_EPOCHS)


def test_versions_increment_in_one_store(stored_twice: Stored, store_root: Path) -> None:
    first, second = stored_twice
    assert (first.manifest.version, second.manifest.version) == (1, 2)
    assert first.path == store_root / "digits-mlp" / "1"
    assert list_versions(store_root, "digits-mlp") == [1, 2]
    # Deterministic for a seed: the second run trained and froze the very same network.
    assert first.accuracies == second.accuracies
    assert [bn.stats_sha256 for bn in first.manifest.batch_norm] == [
        bn.stats_sha256 for bn in second.manifest.batch_norm
    ]


def test_manifest_round_trips_and_describes_the_files(stored_twice: Stored) -> None:
    result = stored_twice[0]
    manifest = read_manifest(result.path)
    assert manifest == result.manifest
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest
    assert manifest.inputs[0].name == "input" and manifest.inputs[0].shape == (64,)
    assert manifest.outputs[0].name == "logits" and manifest.outputs[0].shape == (10,)
    assert manifest.labels == [str(d) for d in range(10)]
    assert [bn.placement for bn in manifest.batch_norm] == [
        "folded_into_next",
        "folded_into_previous",
        "folded_into_previous",
    ]
    for entry in manifest.files:
        path = result.path / entry.path
        assert sha256_file(path) == entry.sha256
        assert path.stat().st_size == entry.size_bytes < 1 << 20
    check_files(result.path, manifest)
    assert len(manifest.golden.inputs) == len(manifest.golden.outputs) == 8
    assert all(len(row) == 64 for row in manifest.golden.inputs)
    provenance = manifest.provenance
    assert provenance.command == (
        f"foldserve train digits-mlp --store {result.path.parent.parent} --seed 0 "
        f"--epochs {TINY_EPOCHS} --bn-stats population"
    )
    assert provenance.onnx_opset >= 18
    # The architecture's own row cap, proven bit for bit at every batch size up to it.
    assert manifest.batching.max_batch_size == 512 and manifest.batching.max_delay_ms == 2.0
    assert manifest.verification.bitwise_max_rows == 512


def test_the_server_checks_pass_on_the_stored_version(stored_twice: Stored) -> None:
    result = stored_twice[0]
    options = BackendOptions(device="cpu")
    for backend in (
        OnnxBackend(result.path / "model.onnx", options),
        TorchScriptBackend(result.path / "model.ts", options),
    ):
        report = verify_loaded_model(result.manifest, backend)
        assert report.golden_max_abs_diff <= result.manifest.verification.atol


@pytest.fixture(scope="module")
def stored_onnx(stored_twice: Stored) -> OnnxBackend:
    return OnnxBackend(stored_twice[0].path / "model.onnx", BackendOptions(device="cpu"))


@settings(max_examples=40, deadline=None)
@given(
    probe=st.integers(0, 449),
    mates=st.lists(st.integers(0, 449), min_size=1, max_size=40),
    scale=st.floats(0.0, 100.0),
    position=st.integers(0, 40),
)
def test_stored_model_is_batch_invariant(
    stored_onnx: OnnxBackend,
    digits_flat: Dataset,
    probe: int,
    mates: list[int],
    scale: float,
    position: int,
) -> None:
    sample = digits_flat.x_test[probe]
    # Scaled mates: far from anything seen in training, and so from the probe.
    batch = digits_flat.x_test[mates] * np.float32(scale)
    position %= len(batch) + 1
    batch = np.insert(batch, position, sample, axis=0)
    alone = stored_onnx.run(sample[np.newaxis])[0]
    inside = stored_onnx.run(batch)[position]
    np.testing.assert_allclose(inside, alone, atol=1e-5, rtol=0)


def test_a_failure_during_the_write_leaves_no_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = service.store._write_durably

    def fail_on_manifest(path: Path, content: bytes) -> None:
        if path.name == service.store.MANIFEST_FILE:
            raise OSError("disk full (injected)")
        real_write(path, content)

    monkeypatch.setattr(service.store, "_write_durably", fail_on_manifest)
    with pytest.raises(OSError, match="injected"):
        build.run(CONFIG, tmp_path, progress=False)
    model_root = tmp_path / "digits-mlp"
    assert list_versions(tmp_path, "digits-mlp") == []
    assert list(model_root.iterdir()) == []  # the staging folder is gone too

    monkeypatch.undo()
    assert build.run(CONFIG, tmp_path, progress=False).manifest.version == 1


def _unfolded_in_training_mode(model: nn.Module, _example: torch.Tensor) -> FoldResult:
    """A broken folder: hands back the network untouched, BNs in training mode."""
    return FoldResult(module=copy.deepcopy(model).train(), records=())


def test_a_model_failing_verification_is_refused_and_not_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(fold, "fold_batch_norms", _unfolded_in_training_mode)
    with pytest.warns(UserWarning, match="training mode"), pytest.warns(torch.jit.TracerWarning):
        with pytest.raises(VerificationError, match="batch-statistics ops"):
            build.run(CONFIG, tmp_path, progress=False)
        status = cli.main(
            ["train", "digits-mlp", "--store", str(tmp_path), "--epochs", str(TINY_EPOCHS)]
        )
    assert status == 1
    err = capsys.readouterr().err
    assert "refused: digits-mlp was not stored" in err
    assert "BatchNormalization" in err
    assert list_versions(tmp_path, "digits-mlp") == []
    assert not (tmp_path / "digits-mlp").exists()  # refused before the store was touched


def test_cli_trains_verifies_stores_and_summarizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "cancer-mlp", "--store", str(tmp_path), "--epochs", "3", "--bn-stats", "ema"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"stored cancer-mlp version 1 at {tmp_path / 'cancer-mlp' / '1'}" in out
    assert "folded_into_next" in out and "population statistics" in out
    manifest = read_manifest(tmp_path / "cancer-mlp" / "1")
    assert manifest.labels == ["malignant", "benign"]
    assert manifest.provenance.bn_stats == "ema"
    assert manifest.provenance.command.endswith("--epochs 3 --bn-stats ema")


def test_cli_rejects_an_unknown_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "imagenet-resnet", "--store", "/nonexistent"])
    assert "invalid choice" in capsys.readouterr().err
