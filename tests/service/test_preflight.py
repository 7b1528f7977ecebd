"""Fail fast: a setting that can never work stops `foldserve serve` before it listens (and
before any worker starts), with one line; what can change while it runs stays a readiness
reason."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from service import cli, preflight, server
from service.cli import main
from service.errors import ConfigError
from service.preflight import check_startup
from service.settings import Settings
from service.store import MANIFEST_FILE, version_dir
from tests.service.conftest import ROOT, Artifacts, add_version
from tests.service.server_process import until_ready


def settings(store: Path, **extra: Any) -> Settings:
    return Settings(model_store=store, default_model="tiny", **extra)


def refused(settings: Settings) -> str:
    with pytest.raises(ConfigError) as error:
        check_startup(settings)
    assert "\n" not in error.value.message  # one line
    return error.value.message


def test_a_good_store_passes(store: Path) -> None:
    check_startup(settings(store))


def test_a_store_that_cannot_be_read_is_refused(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = refused(settings(tmp_path / "nowhere"))
    assert "model_store (FOLDSERVE_MODEL_STORE=" in missing and "does not exist" in missing
    (tmp_path / "file").write_text("")
    assert "is not a folder" in refused(settings(tmp_path / "file"))

    def listdir(path: object) -> list[str]:
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patched:  # as root here, a mode of 000 would not stop us
        patched.setattr(preflight.os, "listdir", listdir)
        assert "cannot be read (Permission denied)" in refused(settings(store))
    (store / MANIFEST_FILE).write_text("{}")  # a version's file beside model folders
    assert "point it at one of them" in refused(settings(store))


def test_a_default_model_not_in_a_store_of_several_is_refused_unless_asked_to_wait(
    store: Path, artifacts: Artifacts
) -> None:
    # One model: it answers as the default whatever it is called (KServe's InferenceService).
    check_startup(settings(store).model_copy(update={"default_model": "tinny"}))
    add_version(store, artifacts, "other")
    message = refused(settings(store).model_copy(update={"default_model": "tinny"}))
    assert message.startswith("default_model (FOLDSERVE_DEFAULT_MODEL=tinny) is not in the model")
    assert "(it holds other, tiny): did you mean 'tiny'? set --default-model" in message
    assert "FOLDSERVE_MISSING_MODEL=unready" in message
    check_startup(
        settings(store, missing_model="unready").model_copy(update={"default_model": "x"})
    )


def test_a_default_model_its_policy_leaves_without_a_version_is_refused(
    store: Path, artifacts: Artifacts
) -> None:
    none = refused(settings(store, model_versions={"tiny": {"versions": [5]}}))
    assert "versions [1], none of which model_versions serves" in none
    add_version(store, artifacts)  # version 2
    policy = {"tiny": {"latest": 1, "default": 1}}
    assert "version 1 the default of model 'tiny', but the versions served are [2]" in refused(
        settings(store, model_versions=policy)
    )


def test_a_backend_without_its_files_or_its_runtime_is_refused(
    tmp_path: Path, artifacts: Artifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    add_version(root, artifacts, formats=("onnx",))
    message = refused(settings(root, backend="torchscript", allow_torchscript=True))
    assert message == (
        "default model 'tiny' has no torchscript file in any version (it has onnx): "
        "set --backend onnx"
    )
    monkeypatch.setattr(preflight, "installed", lambda module: module != "torch")
    assert "needs torch, which is not installed: pip install 'foldserve[torchscript]'" in (
        refused(settings(root, backend="torchscript", allow_torchscript=True))
    )


def test_a_key_file_that_cannot_be_read_is_refused(store: Path, tmp_path: Path) -> None:
    message = refused(settings(store, api_key_file=tmp_path / "keys"))
    assert "api_key_file (FOLDSERVE_API_KEY_FILE=" in message and "cannot be read" in message


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA can run here"
)
def test_cuda_that_cannot_run_is_refused(store: Path) -> None:
    message = refused(settings(store, device="cuda"))
    assert message.startswith("device (FOLDSERVE_DEVICE=cuda) cannot be used: device 'cuda'")


def test_a_version_failing_its_checks_is_a_readiness_reason_not_a_refusal(store: Path) -> None:
    """The store can be fixed while the server runs (a rescan picks up a good version), and the
    other models keep serving meanwhile: no exit for what the checks at load find."""
    model = version_dir(store, "tiny", 1) / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1])  # sha256 no longer matches
    check_startup(settings(store))


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    fake = {k: v for k, v in os.environ.items() if not k.upper().startswith("FOLDSERVE_")}
    fake["FOLDSERVE_GRPC"] = "false"  # its own port: off, as in every test server
    monkeypatch.setattr(os, "environ", fake)
    return fake


def test_workers_are_never_started_for_a_bad_setting(
    environ: dict[str, str],
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    started: list[object] = []
    monkeypatch.setattr(cli, "Supervisor", lambda *a, **k: started.append(a))
    monkeypatch.setattr(cli, "listening_sockets", lambda *a: started.append(a))
    missing = str(store / "nowhere")
    command = ["serve", "--workers", "2", "--model-store", missing, "--default-model", "tiny"]
    assert main(command) == 2
    assert started == []  # no socket, no worker: nothing to restart in a loop
    (line,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.levelname == "CRITICAL" and "nowhere) does not exist" in line.getMessage()


def test_a_server_whose_default_model_fails_its_checks_still_starts(
    environ: dict[str, str], store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[Settings] = []
    monkeypatch.setattr(server, "serve", lambda app, settings, *_: served.append(settings))
    model = version_dir(store, "tiny", 1) / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1])
    assert main(["serve", "--model-store", str(store), "--default-model", "tiny"]) == 0
    assert len(served) == 1


def test_foldserve_serve_exits_at_once_with_one_line(store: Path, artifacts: Artifacts) -> None:
    add_version(store, artifacts, "other")  # two models: neither answers for a third name
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FOLDSERVE_")}
    env["FOLDSERVE_GRPC"] = "false"  # its own port: off, as in every test server
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        "serve",
        "--port",
        str(port),
        "--model-store",
        str(store),
        "--default-model",
        "tinny",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "service", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.endswith(
        f"CRITICAL service.cli: foldserve cannot start: default_model "
        f"(FOLDSERVE_DEFAULT_MODEL=tinny) is not in the model store {store} (it holds other, "
        "tiny): did you mean 'tiny'? set --default-model to one of them, or "
        "FOLDSERVE_MISSING_MODEL=unready to start unready until it arrives"
    )
    assert done.stdout == ""


def test_torchscript_needs_the_operators_opt_in(store: Path) -> None:
    assert "FOLDSERVE_ALLOW_TORCHSCRIPT=true" in refused(settings(store, backend="torchscript"))


# onnxruntime itself writes nothing when it sees a CI system (read from its library's strings), and
# XDG_CACHE_HOME moves the database: without these, the "telemetry on" control would be meaningless.
ONNXRUNTIME_QUIETS_UNDER = frozenset(
    {
        "CI",
        "XDG_CACHE_HOME",
        "TF_BUILD",
        "GITHUB_ACTIONS",
        "GITLAB_CI",
        "CIRCLECI",
        "TRAVIS",
        "JENKINS_URL",
        "CODEBUILD_BUILD_ID",
        "BUILDKITE",
        "TEAMCITY_VERSION",
        "APPVEYOR",
        "BITBUCKET_BUILD_NUMBER",
        "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI",
    }
)


@pytest.mark.parametrize("telemetry", [False, True], ids=["default", "telemetry on"])
def test_foldserve_serve_keeps_onnxruntime_from_writing_its_telemetry(
    tmp_path: Path, telemetry: bool
) -> None:
    # onnxruntime 1.29+ writes a database under ~/.cache/Microsoft (and fails loudly on a
    # read-only root) unless ORT_DISABLE_TELEMETRY is set before it loads.
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("FOLDSERVE_", "ORT_")) and k not in ONNXRUNTIME_QUIETS_UNDER
    }
    env |= {"HOME": str(home), "FOLDSERVE_ONNXRUNTIME_TELEMETRY": str(telemetry).lower()}
    env["FOLDSERVE_GRPC"] = "false"  # its own port: off, as in every test server
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    command += ["--model-store", str(ROOT / "model_store")]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        until_ready(f"http://127.0.0.1:{port}", server, timeout=60)
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    assert (home / ".cache" / "Microsoft").exists() == telemetry


def test_a_grpc_port_in_use_or_not_shared_by_the_workers_is_refused() -> None:
    shipped = ROOT / "model_store"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = refused(Settings(model_store=shipped, grpc=True, grpc_port=port))
        assert f"127.0.0.1:{port}" in message and "FOLDSERVE_GRPC_PORT" in message
    check_startup(Settings(model_store=shipped, grpc=True, grpc_port=port))  # free again
    check_startup(Settings(model_store=shipped, grpc=False, grpc_port=port, port=port))
    message = refused(Settings(model_store=shipped, grpc=True, grpc_port=0, workers=2))
    assert "port of its own" in message
    assert "both" in refused(Settings(model_store=shipped, grpc=True, grpc_port=8000, port=8000))
