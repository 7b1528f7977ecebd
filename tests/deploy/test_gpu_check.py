"""scripts/gpu-check on a machine without a GPU: its Python part compares the CPU provider with
itself (the comparison, the load checks, the timings, the served cases and the table), and its
shell part parses and plans the install the GPU image makes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.deploy.conftest import GPU_DOCKERFILE, ROOT, STORE, load_script
from tests.deploy.dockerfile import parse

SCRIPT = ROOT / "scripts" / "gpu-check"
gpu_check = load_script("gpu_check", ROOT / "scripts" / "gpu_check.py")


def test_the_shell_script_parses_and_plans_the_gpu_images_install() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    plan = subprocess.run([str(SCRIPT), "--plan"], capture_output=True, text=True, check=True)
    (arg,) = next(s for s in parse(GPU_DOCKERFILE) if s.name == "build").all("ARG")
    version = arg.args.split("=")[1]
    assert f"onnxruntime-gpu{'' if 'cudnn]' not in plan.stdout else '[cuda,cudnn]'}=={version}" in (
        plan.stdout
    )
    lines = plan.stdout.splitlines()
    # The image's order: the locked serving set, the CPU onnxruntime out, the GPU one in.
    assert lines.index("uninstall: onnxruntime") == 2
    assert lines[1] == "install: --constraint docker/requirements.lock ."
    assert "-m gpu" in plan.stdout and "GPU_CHECK_REQUIRED=1" in plan.stdout


def test_the_cpu_provider_against_itself_agrees_bit_for_bit() -> None:
    check = gpu_check.check_device(gpu_check.latest(STORE, "digits-cnn"), "cpu", "cpu")
    assert (check.model, check.device) == ("digits-cnn", "cpu")
    # The profile parsed: every Conv and Gemm of the CNN ran on the CPU provider.
    assert check.compute_providers == ["CPUExecutionProvider"]
    assert check.max_abs_diff == 0.0 and check.within_tolerance
    # The shipped models are bitwise batch-invariant on the CPU provider (their manifests say so).
    assert check.bitwise_invariant is True and check.bitwise_max_rows == 64


def test_a_drifting_device_is_reported_outside_tolerance_and_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A device whose every output is off by 1e-2: reported, and the script exits 1.
    real = gpu_check.backend

    class Drifting:
        format = "onnx"

        def __init__(self, inner: Any) -> None:
            self.inner, self.device = inner, inner.device

        def run(self, batch: np.ndarray) -> np.ndarray:
            return np.asarray(self.inner.run(batch) + np.float32(1e-2), dtype=np.float32)

        def batch_statistics_ops(self) -> list[str]:
            return list(self.inner.batch_statistics_ops())

    # check_device builds the device under test first, then the reference.
    made: list[str] = []

    def backend(version: Path, device: str) -> Any:
        made.append(device)
        inner = real(version, device)
        return Drifting(inner) if len(made) % 2 == 1 else inner

    monkeypatch.setattr(gpu_check, "backend", backend)
    check = gpu_check.check_device(gpu_check.latest(STORE, "digits-mlp"), "cpu", "cpu")
    assert not check.within_tolerance and 0.009 < check.max_abs_diff < 0.011
    assert check.load_checks.startswith("FAILED: golden outputs differ")
    assert check.invariance_max_diff is None
    made.clear()
    assert gpu_check.main(["--device", "cpu", "--seconds", "0.01", "--requests", "2"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_main_prints_one_row_per_benchmark_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = tmp_path / "figures.json"
    code = gpu_check.main(
        ["--device", "cpu", "--seconds", "0.02", "--requests", "5", "--json", str(figures)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x" in line[:10]]
    assert [row.split(" | ")[0] for row in rows] == ["| mlpx1", "| mlpx64", "| cnnx1", "| cnnx64"]
    saved = json.loads(figures.read_text())
    assert {(t["model"], t["batch"]) for t in saved["timings"]} == set(gpu_check.CASES)
    assert all(s["p50_ms"] > 0 for s in saved["served"])
