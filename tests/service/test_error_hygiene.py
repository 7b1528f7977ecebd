"""What clients read never names a server path or quotes a library's internals; the log keeps
the whole story. Each failure below is provoked, then every answer a client can get about it
(/models, /readyz, V2 readiness, the error of the request itself) is searched."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

import service.verify as verify_module
from service.app import create_app
from service.routes import models as models_route
from service.settings import Settings
from service.store import MANIFEST_FILE
from tests.service.conftest import SHAPE, Artifacts, add_version, serve

# What must never reach a client: the server's paths are checked per test (tmp_path).
INTERNALS = ("Traceback", "[ONNXRuntimeError]", "onnxruntime_src", "errors.pydantic.dev", "Errno")


def client_view(base: str) -> str:
    """Everything a client can read about the server's state."""
    answers = [
        httpx.get(f"{base}/models"),
        httpx.get(f"{base}/readyz"),
        httpx.get(f"{base}/v2/health/ready"),
        httpx.post(f"{base}/predict", json={"inputs": np.zeros((1, *SHAPE)).tolist()}),
    ]
    return "\n".join(answer.text for answer in answers)


def assert_clean(text: str, tmp_path: Path) -> None:
    for secret in (str(tmp_path), str(tmp_path.resolve()), *INTERNALS):
        assert secret not in text, f"{secret!r} reached a client:\n{text}"


def replace_file(version: Path, name: str, content: bytes) -> None:
    """Change a file and its manifest entry together: the sha256 check then passes."""
    (version / name).write_bytes(content)
    manifest = json.loads((version / MANIFEST_FILE).read_text())
    for entry in manifest["files"]:
        if entry["path"] == name:
            entry["sha256"] = hashlib.sha256(content).hexdigest()
            entry["size_bytes"] = len(content)
    (version / MANIFEST_FILE).write_text(json.dumps(manifest))


def reasons(base: str) -> dict[str, str]:
    return {
        m["name"]: m["versions"][0]["reason"] for m in httpx.get(f"{base}/models").json()["models"]
    }


def test_load_failures_name_files_inside_the_store_only(
    tmp_path: Path,
    artifacts: Artifacts,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "store"
    add_version(root, artifacts)  # "tiny": stays good
    garbage = add_version(root, artifacts, name="garbage", formats=("onnx",))
    replace_file(garbage, "model.onnx", b"this is not an ONNX graph")  # onnxruntime refuses it
    broken = add_version(root, artifacts, name="broken")
    (broken / MANIFEST_FILE).write_text('{"name": "broken", "version": "one"}')
    add_version(root, artifacts, name="locked")
    real_sha256 = verify_module.sha256_file

    def sha256_file(path: Path) -> str:
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_sha256(path)

    monkeypatch.setattr(verify_module, "sha256_file", sha256_file)
    caplog.set_level(logging.INFO)
    with serve(create_app(Settings(model_store=root, default_model="garbage"))) as base:
        seen = client_view(base)
        why = reasons(base)
    assert_clean(seen, tmp_path)
    assert (
        why["garbage"]
        == "model.onnx: onnxruntime cannot load the model (details in the server log)"
    )
    assert why["broken"].startswith("broken/1/manifest.json: invalid manifest: version: ")
    assert why["locked"] == "cannot read model.onnx: Permission denied"
    assert why["tiny"] is None
    # The log has what the client does not: the path and onnxruntime's own words.
    assert str(garbage / "model.onnx") in caplog.text and "ONNXRuntimeError" in caplog.text
    assert str(broken / MANIFEST_FILE) in caplog.text


def test_a_runtime_failure_while_serving_reaches_the_log_only(
    tmp_path: Path,
    artifacts: Artifacts,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "store"
    version = add_version(root, artifacts)
    settings = Settings(model_store=root, default_model="tiny", inline_max_ms=0)
    with serve(create_app(settings)) as base:

        def run(self: object, *args: object, **kwargs: object) -> object:
            raise RuntimeError(
                "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
                f"while running Gemm node. onnxruntime_src/core/providers/cpu/math/gemm.cc:97 "
                f"{version / 'model.onnx'}"
            )

        monkeypatch.setattr(ort.InferenceSession, "run", run)
        failed = httpx.post(f"{base}/predict", json={"inputs": np.zeros((1, *SHAPE)).tolist()})
        v2 = httpx.post(
            f"{base}/v2/models/tiny/infer",
            json={
                "inputs": [
                    {"name": "x", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0] * 16}
                ]
            },
        )
    for answer in (failed, v2):
        assert answer.status_code == 500
        assert answer.json() == {
            "error": "inference failed: onnxruntime failed on a batch of 1 rows"
        }
    assert_clean(failed.text + v2.text, tmp_path)
    assert "gemm.cc:97" in caplog.text and str(version) in caplog.text


def test_an_unexpected_error_in_a_framework_route_shows_an_id_only(
    tmp_path: Path,
    artifacts: Artifacts,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "store"
    add_version(root, artifacts)

    def describe(entry: object) -> dict[str, object]:
        raise OSError(2, "No such file or directory", str(tmp_path / "secret" / "place"))

    with serve(create_app(Settings(model_store=root, default_model="tiny"))) as base:
        monkeypatch.setattr(models_route, "describe", describe)
        answer = httpx.get(f"{base}/models")
    assert answer.status_code == 500
    message = answer.json()["error"]
    assert message.startswith("internal error ") and message.endswith(": see the server log")
    assert_clean(answer.text, tmp_path)
    error_id = message.split()[2].rstrip(":")
    (logged,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged.exc_info is not None and "secret" in str(logged.exc_info[1])
