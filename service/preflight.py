"""What ``foldserve serve`` checks before it listens (and, with ``--workers``, before it starts a
worker): settings that can never work stop it at once, with one line naming the value and the
fix, instead of a server that stays up and never becomes ready.

Checked: the store exists, is a readable folder and has one layout; the default model is in it,
with a version its policy serves (and the policy's default version among them) and a file for
the backend; the backend's runtime is installed; ``device=cuda`` can run (probed in a child
process, so no CUDA context stays in this one); the key file reads and holds a key.

Not checked here, and never a reason to exit: what can change while the server runs. A version
failing its load-time checks (sha256, golden outputs, batch invariance) stays out of service
with its reason in ``/models`` and readiness, even when it is the default model's only one: the
other models keep serving, and a good version written into the store is picked up by a rescan
(SIGHUP, ``poll_interval_s``, the repository API) without a restart.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from service.errors import ConfigError, StoreError
from service.keys import read_key_file
from service.settings import Settings, setting_ref, torchscript_not_allowed
from service.store import StoreView, open_store, read_manifest

log = logging.getLogger(__name__)
_PROBE_TIMEOUT_S = 120.0


def check_startup(settings: Settings) -> None:
    """Raise ConfigError, with one line, for the first setting that cannot work."""
    _check_backend(settings)
    store = _check_store(settings.model_store)
    _check_default_model(settings, store)
    if settings.api_key_file is not None:
        read_key_file(settings.api_key_file)
    if settings.device == "cuda":
        _check_device(settings)
    _check_grpc(settings)


def _check_grpc(settings: Settings) -> None:
    """The gRPC port: one that every worker shares, and free (a busy one would end each worker
    as it starts, after its models loaded)."""
    if not settings.grpc:
        return
    port = settings.grpc_port
    if port == 0 and settings.workers > 1:
        raise ConfigError(
            f"{setting_ref('grpc_port', 0)} with {settings.workers} workers: each would listen "
            "on a port of its own; set a port, or grpc=false (FOLDSERVE_GRPC=false)"
        )
    if port == settings.port:
        raise ConfigError(f"grpc_port and port are both {port}: give gRPC a port of its own")
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for gRPC on {settings.host}:{port} "
                f"({setting_ref('grpc_port', port)}): {exc.strerror or exc}; set another port, or "
                "grpc=false (FOLDSERVE_GRPC=false)"
            ) from None


def _check_backend(settings: Settings) -> None:
    if settings.backend == "torchscript" and not settings.allow_torchscript:
        raise ConfigError(torchscript_not_allowed())
    if settings.backend == "torchscript" and not installed("torch"):
        raise ConfigError(
            f"{setting_ref('backend', 'torchscript')} needs torch, which is not installed: "
            "pip install 'foldserve[torchscript]', or serve the ONNX files (--backend onnx)"
        )


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (torch takes seconds)."""
    return importlib.util.find_spec(module) is not None


def _check_store(root: Path) -> StoreView:
    where = setting_ref("model_store", str(root))
    if not root.exists():
        raise ConfigError(f"{where} does not exist: point --model-store at the model store")
    if not root.is_dir():
        raise ConfigError(f"{where} is not a folder: point --model-store at the model store")
    try:
        os.listdir(root)
    except OSError as exc:
        raise ConfigError(
            f"{where} cannot be read ({exc.strerror}): give the server's user read access"
        ) from None
    try:
        return open_store(root)
    except StoreError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def _check_default_model(settings: Settings, store: StoreView) -> None:
    asked = settings.default_model
    models = store.models()
    name = store.answering_for(asked)
    if name is None:
        if settings.missing_model == "unready":
            log.warning(
                "%s is not in the model store %s (it holds %s): serving the others, not ready "
                "until it arrives (%s)",
                setting_ref("default_model", asked),
                settings.model_store,
                ", ".join(models) or "no model",
                setting_ref("missing_model", "unready"),
            )
            return
        close = difflib.get_close_matches(asked, models, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{setting_ref('default_model', asked)} is not in the model store "
            f"{settings.model_store} (it holds {', '.join(models) or 'no model'}): {hint}"
            "set --default-model to one of them, or FOLDSERVE_MISSING_MODEL=unready to start "
            "unready until it arrives"
        )
    if name != asked:
        log.info(
            "the model store holds one model, %r: it answers as %r (default_model) too",
            name,
            asked,
        )
    available = store.versions(name)
    policy = settings.model_versions.get(name)
    wanted = available if policy is None else policy.wanted(available)
    if not wanted:
        why = (
            "no complete version (a numbered folder with a manifest.json)"
            if not available
            else f"versions {available}, none of which model_versions serves"
        )
        raise ConfigError(f"default model {name!r} has {why}: nothing could answer its requests")
    if policy is not None and policy.default is not None and policy.default not in wanted:
        raise ConfigError(
            f"model_versions makes version {policy.default} the default of model {name!r}, but "
            f"the versions served are {wanted}: choose one of them"
        )
    formats: set[str] = set()
    for version in wanted:
        try:
            manifest = read_manifest(store.version_dir(name, version))
        except StoreError:
            continue  # that version's problem: its readiness reason will say it
        formats.update(f.format for f in manifest.files)
        if manifest.file(settings.backend) is not None:
            return
    if formats:  # every readable manifest lacks the backend's file
        raise ConfigError(
            f"default model {name!r} has no {settings.backend} file in any version (it has "
            f"{', '.join(sorted(formats))}): set --backend {sorted(formats)[0]}"
        )


def _check_device(settings: Settings) -> None:
    """Run ``_probe`` in a child process: it proves the device works, and the CUDA context it
    creates (hundreds of MB of GPU memory) ends with the child, not in a --workers supervisor."""
    command = [
        sys.executable,
        "-c",
        f"from service.preflight import _probe; _probe({settings.backend!r})",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"device 'cuda' did not answer within {_PROBE_TIMEOUT_S:g} s: check the GPU driver"
        ) from None
    if done.returncode != 0:
        lines = (done.stdout.strip() or done.stderr.strip() or "the probe failed").splitlines()
        raise ConfigError(f"{setting_ref('device', 'cuda')} cannot be used: {lines[-1]}")


def _probe(backend: str) -> None:
    """In the child: run one tiny model on the GPU; print why not and exit 1 if it cannot."""
    try:
        if backend == "torchscript":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("torch sees no GPU: set --device cpu (or auto)")
            torch.zeros(1, device="cuda").add_(1)
        else:
            _probe_onnxruntime()
    except ConfigError as exc:
        print(exc.message)
        raise SystemExit(1) from None


def _probe_onnxruntime() -> None:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from service.backends.onnx import choose_providers

    providers = choose_providers("cuda", ort.get_available_providers())
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=providers)
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise ConfigError(
            f"onnxruntime falls back to {session.get_providers()}: check the GPU driver and "
            "that the container sees the GPU (--gpus all), or set --device cpu"
        )
    session.run(None, {"x": np.ones(1, dtype=np.float32)})
