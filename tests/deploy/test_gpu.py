"""The GPU path: foldserve on onnxruntime's CUDA provider, as docker/Dockerfile.gpu ships it.

Marked `gpu`: each test skips without a usable CUDA provider (the plain install has none), and
scripts/gpu-check runs them in an onnxruntime-gpu venv with GPU_CHECK_REQUIRED=1, where a skip
is a failure. One test here runs everywhere else instead: what FOLDSERVE_DEVICE=cuda (the GPU
image's setting) does on a machine without a CUDA provider.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.app import create_app
from service.settings import Settings
from service.store import read_manifest
from tests.deploy.conftest import ROOT, STORE, load_script
from tests.service.conftest import serve

CUDA = "CUDAExecutionProvider"
MODELS = sorted(p.name for p in STORE.iterdir() if p.is_dir())
gpu_check = load_script("gpu_check", ROOT / "scripts" / "gpu_check.py")


def cuda_unusable() -> str | None:
    """Why the CUDA provider cannot run here, or None when it can."""
    if CUDA not in ort.get_available_providers():
        return f"onnxruntime offers no {CUDA} ({ort.get_available_providers()}): no onnxruntime-gpu"
    # onnxruntime-gpu lists the provider even where it cannot load it (no GPU, no CUDA libraries)
    # and then quietly runs on the CPU: only a session says which one it got.
    model = gpu_check.latest(STORE, MODELS[0]) / "model.onnx"
    session = ort.InferenceSession(str(model), providers=[CUDA, "CPUExecutionProvider"])
    if session.get_providers()[0] != CUDA:
        return f"{CUDA} is installed but does not load here (no GPU or CUDA/cuDNN libraries)"
    return None


@pytest.fixture(scope="module")
def cuda() -> None:
    reason = cuda_unusable()
    if reason is not None:
        if os.environ.get("GPU_CHECK_REQUIRED") == "1":
            pytest.fail(f"scripts/gpu-check needs CUDA: {reason}")
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_the_cuda_provider_is_selected_and_runs_the_graph(cuda: None, model: str) -> None:
    version = gpu_check.latest(STORE, model)
    assert gpu_check.backend(version, "cuda").device == "cuda"
    # Selected is not enough: onnxruntime may still place nodes on the CPU. Its profile of a run
    # says where every node went; the arithmetic must all be on CUDA.
    manifest = read_manifest(version)
    inputs = np.asarray(manifest.golden.inputs, dtype=np.float32)
    ran = gpu_check.placements(
        version / "model.onnx", "cuda", inputs.reshape(-1, *manifest.inputs[0].shape)
    )
    compute = {op: providers for op, providers in ran.items() if op in gpu_check.COMPUTE_OPS}
    assert compute and all(providers == {CUDA} for providers in compute.values()), ran


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_outputs_equal_the_cpu_providers_and_batch_invariance_holds(cuda: None, model: str) -> None:
    check = gpu_check.check_device(gpu_check.latest(STORE, model), "cuda", "cpu")
    # Reported, then held to the manifest's tolerance; bitwise invariance is measured and shown
    # (a GPU kernel may sum in another order for another batch size), not required.
    print(
        f"\n{model}: cuda vs cpu max abs diff {check.max_abs_diff:.3g} (rel "
        f"{check.max_rel_diff:.2g}), batch invariance max diff {check.invariance_max_diff:.3g}, "
        f"bitwise batch-invariant: {check.bitwise_invariant} ({check.bitwise_note})"
    )
    assert check.device == "cuda" and check.compute_providers == [CUDA]
    assert check.within_tolerance and check.load_checks == "passed", check
    assert check.bitwise_invariant is not None, check.bitwise_note


@pytest.mark.gpu
def test_the_server_serves_every_model_on_cuda(cuda: None, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(STORE, store)
    with serve(create_app(Settings(model_store=store, device="cuda"))) as base:
        models = httpx.get(f"{base}/models").json()["models"]
        assert {(m["name"], v["status"], v["device"]) for m in models for v in m["versions"]} == {
            (name, "ready", "cuda") for name in MODELS
        }
        golden = read_manifest(gpu_check.latest(store, "digits-mlp")).golden
        answer = httpx.post(f"{base}/predict", json={"inputs": golden.inputs})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["outputs"], golden.outputs, rtol=1e-4, atol=1e-4)


def test_device_cuda_without_a_cuda_provider_serves_nothing_and_says_why(tmp_path: Path) -> None:
    # The app on a node without a GPU: no model loads, readiness stays 503 with the fix named.
    # (`foldserve serve`, the images' entrypoint, does not get this far: it probes the device
    # before it listens and exits with one line; tests/service/test_preflight.py.)
    if CUDA in ort.get_available_providers():
        pytest.skip("onnxruntime here offers a CUDA provider")
    store = tmp_path / "store"
    shutil.copytree(STORE, store)
    with serve(create_app(Settings(model_store=store, device="cuda"))) as base:
        ready = httpx.get(f"{base}/readyz")
        alive = httpx.get(f"{base}/healthz")
    assert alive.status_code == 200
    assert ready.status_code == 503
    reasons = [entry["reason"] for entry in ready.json()["models"]]  # one per version
    assert len(reasons) == len(MODELS)
    assert all("device 'cuda' requested" in r and "FOLDSERVE_DEVICE=cpu" in r for r in reasons)
