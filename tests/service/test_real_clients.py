"""Real clients, unmodified, against a real server on a loopback port: tritonclient's HTTP
client (inference, metadata, config, statistics, the repository API) and the KServe Python SDK
(InferenceRESTClient with the V2 protocol: inference, readiness; metadata judged by its own
response models), both through the keys.

Their dependencies pin other fastapi, starlette, uvicorn and numpy releases than the server's,
so they live in a virtual environment of their own, made on first use from the exact versions in
real_clients/ and kept under /var/tmp, keyed on those versions (about 40 s and 350 MB the first
time here; nothing after). The test is skipped only when the package registry is unreachable.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import foldserve
from service.app import create_app
from service.settings import Settings
from tests.service import test_images as images
from tests.service.conftest import SHAPE, Artifacts, add_version, reference, running
from tests.service.pair_model import add_pair_version, pair_inputs, pair_reference

HERE = Path(__file__).parent / "real_clients"
KEY, MANAGEMENT_KEY = "client-key-1", "manage-key-2"
_PIP = ["--disable-pip-version-check", "--quiet"]


def clients_python() -> Path:
    """The python of the clients' environment, made once per set of pinned versions."""
    pins = (HERE / "requirements.txt").read_bytes() + (HERE / "constraints.txt").read_bytes()
    flavour = f"{sys.version_info[:2]}{platform.machine()}".encode()
    key = hashlib.sha256(pins + flavour).hexdigest()[:12]
    root = Path(tempfile.gettempdir() if not os.path.isdir("/var/tmp") else "/var/tmp")
    venv = root / f"foldserve-clients-{os.getuid()}-{key}"
    python = venv / "bin" / "python"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test run builds it; the others wait, then use it
        if (venv / ".complete").exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        _registry_reachable()
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        # NOTE: this environment's pip installs into that one (--python): the venv needs no pip
        # of its own, and --no-compile skips byte-compiling 20,000 files it will never import.
        pins = ["-r", str(HERE / "requirements.txt"), "-c", str(HERE / "constraints.txt")]
        pip = [sys.executable, "-m", "pip", "--python", str(python), "install", *_PIP]
        install = subprocess.run([*pip, "--no-compile", *pins], capture_output=True, text=True)
        if install.returncode != 0:
            pytest.fail(f"installing the clients failed:\n{install.stderr[-3000:]}")
        (venv / ".complete").write_text("")
    return python


def _registry_reachable() -> None:
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "kserve", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0 or "0.21.0" not in probe.stdout:
        lines = (probe.stderr or probe.stdout).strip().splitlines()
        pytest.skip(f"package registry unreachable (or without kserve 0.21.0): {lines[-1:]}")


def close(got: Any, expected: np.ndarray) -> None:
    assert not isinstance(got, dict), got  # a dict here is a client's exception, reported
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), expected, rtol=0, atol=1e-5)


def test_tritonclient_and_the_kserve_sdk_work_unchanged(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    python = clients_python()
    root = tmp_path / "store"
    add_version(root, artifacts)
    add_pair_version(root)
    x = np.random.default_rng(3).normal(size=(3, *SHAPE)).astype(np.float32)
    expected = reference(root, x)
    pair = pair_inputs(2, seed=4)
    pair_expected = pair_reference(pair)
    torch.manual_seed(0)
    pets = foldserve.export(
        images.Net().eval(),
        images.SHAPE,
        store=root,
        name="pets",
        image_mean=images.MEAN,
        image_std=images.STD,
    )
    files = [
        images.encoded(images.picture(7), "JPEG"),
        images.encoded(images.picture(8), "PNG"),
    ]
    pixels = np.stack([images.preprocessed(f) for f in files])
    session = ort.InferenceSession(
        str(pets.path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (pets_expected,) = session.run(None, {"input": pixels})
    settings = Settings(
        model_store=root,
        default_model="tiny",
        api_key=KEY,
        management_api=True,
        management_api_key=MANAGEMENT_KEY,
    )
    with running(create_app(settings), key=KEY) as (base, _):
        config = {
            "url": base,
            "key": KEY,
            "management_key": MANAGEMENT_KEY,
            "model": "tiny",
            "inputs": x.tolist(),
            "several": {"model": "pair", "inputs": {k: v.tolist() for k, v in pair.items()}},
            "image": {
                "model": "pets",
                "input": "input",
                "output": "logits",
                "files": [base64.b64encode(f).decode() for f in files],
            },
        }
        done = subprocess.run(
            [str(python), str(HERE / "run_clients.py")],
            input=json.dumps(config),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    triton, kserve = results["tritonclient"], results["kserve"]

    for name in ("is_server_live", "is_server_ready", "is_model_ready", "ready_after_load"):
        assert triton[name] is True, (name, triton[name])
    assert triton["ready_after_unload"] is False
    extensions = triton["get_server_metadata"]["extensions"]
    assert {"binary_tensor_data", "statistics", "model_repository"} <= set(extensions)
    metadata = triton["get_model_metadata"]
    assert metadata["name"] == "tiny" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]}]
    assert triton["get_model_config"]["max_batch_size"] >= 64
    for name in ("infer_binary", "infer_json", "infer_after_load"):
        close(triton[name], expected)
    assert triton["infer_after_unload"]["status"] == "404"
    assert triton["index_without_key"]["status"] == "401"
    for name in ("stats_all", "stats_model", "stats_version"):
        (stat,) = [s for s in triton[name]["model_stats"] if s["name"] == "tiny"]
        assert (stat["name"], stat["version"]) == ("tiny", "1")
        assert stat["inference_count"] == 2 * len(x)  # the two calls before the unload
        assert stat["inference_stats"]["success"]["count"] == 2
        # Where the time went, as tritonclient shows it: every stage counted and timed.
        for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert stat["inference_stats"][stage]["count"] >= 2, stage
            assert int(stat["inference_stats"][stage]["ns"]) > 0, stage
    assert {"name": "tiny", "version": "1", "state": "READY", "reason": ""} in triton["index"]
    assert triton["unload"] is None and triton["load"] is None

    for name in ("is_server_live", "is_server_ready", "is_model_ready"):
        assert kserve[name] is True, (name, kserve[name])
    assert kserve["is_model_ready_without_key"] is False
    for name in ("infer_json", "infer_binary"):
        close(kserve[name], expected)
    assert kserve["server_metadata"]["name"] == "foldserve"
    assert kserve["model_metadata"]["name"] == "tiny"
    assert kserve["model_metadata"]["inputs"][0]["shape"] == [-1, *SHAPE]
    assert kserve["model_ready"] == {"name": "tiny", "ready": True}

    several = results["several_tritonclient"]
    assert [i["name"] for i in several["metadata"]["inputs"]] == ["a", "b"]
    assert several["infer_all"]["order"] == ["logits", "scaled"]
    assert several["infer_asked"]["order"] == ["scaled", "logits"]
    for call in ("infer_all", "infer_asked"):
        for name in ("logits", "scaled"):
            close(several[call][name], pair_expected[name])
    for name in ("logits", "scaled"):
        close(results["several_kserve"]["infer"][name], pair_expected[name])
    close(results["image_tritonclient"]["infer"], pets_expected)
