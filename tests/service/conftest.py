"""Fixtures: tiny real model stores (built here with torch, not the trainer), a copy of the shipped
store, and a real server."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.app import Service
from service.http.request import KNOWN, Body, Head, Request
from service.http.server import HttpServer
from service.server import run_in_thread
from service.store import (
    BatchingConfig,
    Golden,
    Manifest,
    ModelFile,
    ModelFormat,
    Provenance,
    TensorSpec,
    Verification,
    write_version,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_STORE = ROOT / "model_store"
SHAPE = (2, 8)  # per sample; two dimensions so nested and flat samples differ
CLASSES = ["ant", "bee", "cat", "dog"]


@dataclass(frozen=True)
class Artifacts:
    onnx: bytes
    torchscript: bytes
    golden_inputs: np.ndarray  # (8, *SHAPE)
    golden_outputs: np.ndarray  # (8, 4), computed by onnxruntime on the exported file


def export_artifacts(net: Any, out: Path, *, training: bool = False) -> Artifacts:
    """Export ``net`` (per-sample input SHAPE, 4 outputs) to ONNX and TorchScript.

    ``training=True`` exports it as in training: a BatchNorm then stays a BatchNormalization op
    that normalizes with the statistics of the batch it is given. Golden outputs are what
    onnxruntime computes on the file for the 8 golden inputs in one batch, as the server checks.
    """
    import torch

    example = torch.randn(3, *SHAPE)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, ts_path = out / "model.onnx", out / "model.pt"
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        # The legacy exporter and torch.jit both warn that they are deprecated in torch 2.13;
        # tracing a training-mode BN warns about its batch-size check and its dropped
        # running-statistics update, both expected here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        if training:
            warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
            warnings.filterwarnings("ignore", message="ONNX Preprocess - Removing mutation")
        torch.onnx.export(
            net,
            (example,),
            onnx_path,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
            training=mode,
            do_constant_folding=not training,
        )
        if not training:  # a training-mode program is only ever stored as ONNX here
            traced = torch.jit.trace(net, example)  # type: ignore[no-untyped-call]
            torch.jit.save(traced, ts_path)
    golden_inputs = np.random.default_rng(1).normal(size=(8, *SHAPE)).astype(np.float32)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (golden_outputs,) = session.run(None, {"x": golden_inputs})
    torchscript = b"" if training else ts_path.read_bytes()
    return Artifacts(onnx_path.read_bytes(), torchscript, golden_inputs, golden_outputs)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(16, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, len(CLASSES)),
    ).eval()
    return export_artifacts(net, tmp_path_factory.mktemp("export"))


def add_version(
    root: Path,
    art: Artifacts,
    name: str = "tiny",
    *,
    golden_shift: float = 0.0,
    formats: tuple[ModelFormat, ...] = ("onnx", "torchscript"),
    batching: BatchingConfig | None = None,
) -> Path:
    """Write one version of the tiny model; ``golden_shift`` plants a wrong golden output."""
    files = {"model.onnx": art.onnx, "model.pt": art.torchscript}
    paths: dict[ModelFormat, str] = {"onnx": "model.onnx", "torchscript": "model.pt"}
    files = {paths[f]: files[paths[f]] for f in formats}

    def manifest(version: int, digests: dict[str, str]) -> Manifest:
        return Manifest(
            name=name,
            version=version,
            architecture="mlp-16-32-4",
            task="classification",
            inputs=(TensorSpec(name="x", shape=SHAPE),),
            outputs=(TensorSpec(name="logits", shape=(len(CLASSES),)),),
            labels=CLASSES,
            files=tuple(
                ModelFile(
                    format=f,
                    path=paths[f],
                    sha256=digests[paths[f]],
                    size_bytes=len(files[paths[f]]),
                )
                for f in formats
            ),
            batch_norm=(),
            verification=Verification(
                atol=1e-5,
                rtol=1e-5,
                batch_statistics_ops=0,
                max_abs_diff={"onnx": 0.0},
                batch_invariance_max_diff=0.0,
                samples_checked=len(art.golden_inputs),
            ),
            provenance=Provenance(
                dataset="random",
                split="none",
                seed=0,
                epochs=0,
                bn_stats="ema",
                accuracy_ema=0.0,
                accuracy_population=0.0,
                accuracy_unfolded_exported_stats=0.0,
                torch_version="test",
                onnx_opset=17,
                command="tests/service/conftest.py",
                created_at="2026-01-01T00:00:00Z",
            ),
            golden=Golden(
                inputs=art.golden_inputs.reshape(len(art.golden_inputs), -1).tolist(),
                outputs=(art.golden_outputs + golden_shift).tolist(),
            ),
            batching=batching or BatchingConfig(max_batch_size=64, max_delay_ms=5.0),
        )

    return write_version(root, name, files, manifest)


def add_onnx_version(
    root: Path,
    name: str,
    onnx_bytes: bytes,
    golden_inputs: np.ndarray | dict[str, np.ndarray],
    *,
    labels: list[str] | None = None,
    bitwise_claim: tuple[bool, int] | None = None,
    batching: BatchingConfig | None = None,
) -> Path:
    """Store any ONNX model with a manifest; golden outputs are what onnxruntime computes on it
    for ``golden_inputs`` in one batch, as the exporter records them. A model of several inputs
    takes them as a dict by name; every graph output is an output of the manifest.

    ``bitwise_claim`` is what the exporter would have recorded: (bitwise_batch_invariant, rows).
    """
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    named = (
        golden_inputs
        if isinstance(golden_inputs, dict)
        else {session.get_inputs()[0].name: golden_inputs}
    )
    feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in named.items()}
    output_names = [out.name for out in session.get_outputs()]
    results = dict(zip(output_names, session.run(None, feeds), strict=True))
    claim, claim_rows = bitwise_claim if bitwise_claim is not None else (None, None)

    def golden_rows(arrays: dict[str, np.ndarray]) -> list[list[float]]:
        flat = [a.reshape(len(a), -1) for a in arrays.values()]
        return np.concatenate(flat, axis=1).tolist()

    def manifest(version: int, digests: dict[str, str]) -> Manifest:
        return Manifest(
            name=name,
            version=version,
            architecture="test graph",
            task="classification" if labels else "regression",
            inputs=tuple(TensorSpec(name=k, shape=v.shape[1:]) for k, v in feeds.items()),
            outputs=tuple(TensorSpec(name=k, shape=v.shape[1:]) for k, v in results.items()),
            labels=labels or [],
            files=(
                ModelFile(
                    format="onnx",
                    path="model.onnx",
                    sha256=digests["model.onnx"],
                    size_bytes=len(onnx_bytes),
                ),
            ),
            batch_norm=(),
            verification=Verification(
                atol=1e-5,
                rtol=1e-5,
                batch_statistics_ops=0,
                max_abs_diff={"onnx": 0.0},
                batch_invariance_max_diff=0.0,
                samples_checked=len(next(iter(feeds.values()))),
                bitwise_batch_invariant=claim,
                bitwise_max_rows=claim_rows,
            ),
            provenance=Provenance(
                entry_point="import",
                fold_path="onnx",
                bn_stats="as_imported",
                onnx_opset=17,
                command="tests/service/conftest.py",
                created_at="2026-01-01T00:00:00Z",
            ),
            golden=Golden(inputs=golden_rows(feeds), outputs=golden_rows(results)),
            batching=batching or BatchingConfig(),
        )

    return write_version(root, name, {"model.onnx": onnx_bytes}, manifest)


def onnx_reference(version: Path, x: np.ndarray) -> np.ndarray:
    """What onnxruntime computes on a stored version's file, with the server's one thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    path = str(version / "model.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: np.asarray(x, dtype=np.float32)})
    return np.asarray(out)


@pytest.fixture
def store(tmp_path: Path, artifacts: Artifacts) -> Path:
    root = tmp_path / "store"
    add_version(root, artifacts)
    return root


def reference(store_root: Path, x: np.ndarray, name: str = "tiny", version: int = 1) -> np.ndarray:
    """The model file's own outputs: onnxruntime run directly on the stored file."""
    path = store_root / name / str(version) / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.asarray(x, dtype=np.float32).reshape(-1, *SHAPE)})
    return np.asarray(out)


@contextlib.contextmanager
def running(
    app: Service, *, wait_loaded: bool = True, key: str | None = None
) -> Iterator[tuple[str, HttpServer]]:
    """Run ``app`` on the production server (``foldserve serve``'s, with the app's settings) on
    a free loopback port; yield its base URL and the server.

    ``server.request_stop()`` starts the drain a SIGTERM would. ``key``: the inference key, when
    the app requires one (waiting for the models reads /models).
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    server, thread = run_in_thread(app, app.settings, sock)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        if wait_loaded:
            until_loaded(base, key=key)
        yield base, server
    finally:
        server.request_stop()
        thread.join(timeout=20)
        sock.close()


@contextlib.contextmanager
def serve(app: Service, *, wait_loaded: bool = True) -> Iterator[str]:
    """Run ``app`` on the production server on a free loopback port; yield its base URL."""
    with running(app, wait_loaded=wait_loaded) as (base, _):
        yield base


@pytest.fixture
def shipped_store(tmp_path: Path) -> Path:
    """A copy of the shipped model_store: real trained models with every BatchNorm folded."""
    root = tmp_path / "shipped"
    shutil.copytree(SHIPPED_STORE, root)
    return root


def until_loaded(base: str, timeout: float = 20.0, key: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    headers = {} if key is None else {"X-API-Key": key}
    while time.monotonic() < deadline:
        models = httpx.get(f"{base}/models", headers=headers).json()["models"]
        statuses = [v["status"] for m in models for v in m["versions"]]
        if "loading" not in statuses:
            return
        time.sleep(0.02)
    raise AssertionError("models still loading")


class _Flow:
    def want_body(self, body: Body) -> None:
        pass

    def body_waiting(self, body: Body) -> None:
        pass


def http_request(
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    method: str = "POST",
    arrived: float | None = None,
) -> Request:
    """A request as the server hands it to the application, its body already received: for
    testing the request path without a socket. ``headers``: names in lower case."""
    headers = [(b"content-type", b"application/json"), *(headers or [])]
    if body:
        headers.append((b"content-length", str(len(body)).encode()))
    head = Head()
    for name, value in headers:
        known = KNOWN.get(name)
        if known is not None and getattr(head, known) is None:
            setattr(head, known, value)
    stream = Body(_Flow() if body else None)
    if body:
        stream.feed(body)
        stream.end()
    loop_time = asyncio.get_running_loop().time() if arrived is None else arrived
    return Request(
        method,
        path.encode(),
        path,
        b"",
        headers,
        head,
        request_id=b"test",
        started=time.perf_counter(),
        arrived=loop_time,
        body=stream,
    )


def sample_value(app: Service, name: str, labels: dict[str, str]) -> float | None:
    """One sample of the app's /metrics, as Prometheus would read it."""
    value: float | None = app.state.prometheus.get_sample_value(name, labels)
    return value
