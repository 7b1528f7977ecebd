"""scripts/gpu-check's Python part: a device against the CPU provider, and the benchmark's model
cases timed on both, in one table.

For each shipped model: the same ONNX file on the device and on the CPU, the outputs compared
within the manifest's tolerance (golden inputs and wild batch mates); the server's own load checks
run on the device (golden outputs, batch invariance within tolerance); bitwise batch invariance
measured on the device up to the row cap (reported, not required: a GPU kernel may sum in another
order for another batch size). Then the benchmark's model cases (bench/loadtest.py's mlpx1,
mlpx64, cnnx1, cnnx64: a model and the samples per request) timed in-process on each device, and
served over HTTP by a foldserve on each device, every answer checked against the golden outputs.

Run by scripts/gpu-check in its onnxruntime-gpu venv (``--device cuda``); on any machine
``--device cpu`` compares the CPU provider with itself, which is how tests/deploy/test_gpu_check.py
tests this file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the service package is beside it

from service.app import create_app  # noqa: E402
from service.backends import BackendOptions  # noqa: E402
from service.backends.onnx import OnnxBackend, choose_providers  # noqa: E402
from service.errors import VerificationError  # noqa: E402
from service.server import run_in_thread  # noqa: E402
from service.settings import Device, Settings  # noqa: E402
from service.store import read_manifest  # noqa: E402
from service.verify import (  # noqa: E402
    golden_inputs,
    max_relative_diff,
    measure_bitwise,
    verify_loaded_model,
    wild_mates,
    within_tolerance,
)

STORE = ROOT / "model_store"
# The ops that carry the models' arithmetic, as onnxruntime names them after its fusions; shape
# ops (Reshape, ...) may stay on the CPU on purpose.
COMPUTE_OPS = frozenset({"Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Conv", "FusedConv"})
# bench/loadtest.py's model cases: (model, samples per request).
CASES: tuple[tuple[str, int], ...] = (
    ("digits-mlp", 1),
    ("digits-mlp", 64),
    ("digits-cnn", 1),
    ("digits-cnn", 64),
)


@dataclass(frozen=True)
class DeviceCheck:
    model: str
    version: int
    device: str  # where onnxruntime ran it (the backend's own report), not what was asked
    compute_providers: list[str]  # the providers that ran COMPUTE_OPS nodes in a profiled run
    max_abs_diff: float  # against the reference device, golden inputs and wild batch mates
    max_rel_diff: float  # the same over each sample's largest |output|
    atol: float  # the manifest's tolerance
    rtol: float
    within_tolerance: bool
    load_checks: str  # "passed", or why the server would refuse the version on this device
    invariance_max_diff: float | None  # the server's batch-invariance check, on the device
    bitwise_invariant: bool | None  # alone vs every batch size up to bitwise_max_rows
    bitwise_max_rows: int
    bitwise_note: str


@dataclass(frozen=True)
class Timing:
    model: str
    batch: int
    device: str
    median_us: float  # one session.run of ``batch`` rows
    samples_per_s: float


@dataclass(frozen=True)
class Served:
    model: str
    batch: int
    device: str
    requests: int
    p50_ms: float  # one connection, requests one after another
    p99_ms: float


def latest(store: Path, model: str) -> Path:
    versions = [int(p.name) for p in (store / model).iterdir() if p.name.isdigit()]
    return store / model / str(max(versions))


def backend(version_dir: Path, device: Device) -> OnnxBackend:
    onnx_file = read_manifest(version_dir).file("onnx")
    assert onnx_file is not None, f"{version_dir} has no ONNX file"
    return OnnxBackend(version_dir / onnx_file.path, BackendOptions(device, 1))


def placements(model_file: Path, device: Device, inputs: np.ndarray) -> dict[str, set[str]]:
    """The execution providers that ran each op type in one run, as onnxruntime's profile says.

    The backend reporting CUDA means CUDA was selected; this says which nodes it really ran.
    """
    providers = choose_providers(device, ort.get_available_providers())
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(model_file), options, providers=providers)
        session.run(None, {session.get_inputs()[0].name: inputs})
        events = json.loads(Path(session.end_profiling()).read_text())
    found: dict[str, set[str]] = defaultdict(set)
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            found[args["op_name"]].add(args["provider"])
    return dict(found)


def check_device(version_dir: Path, device: Device, reference: Device = "cpu") -> DeviceCheck:
    """One model version on ``device`` against ``reference``, and the server's load checks there."""
    manifest = read_manifest(version_dir)
    tested, expected_on = backend(version_dir, device), backend(version_dir, reference)
    probes = golden_inputs(manifest)
    inputs = np.concatenate([probes, wild_mates(probes, np.random.default_rng(0))])
    actual, expected = tested.run(inputs), expected_on.run(inputs)
    atol, rtol = manifest.verification.atol, manifest.verification.rtol
    rows = manifest.batching.max_batch_size
    try:
        report = verify_loaded_model(manifest, tested, rows)  # what the server checks at load
    except VerificationError as exc:
        load_checks, invariance = f"FAILED: {exc.message}", None
    else:
        load_checks, invariance = "passed", report.batch_invariance_max_diff
    bits = measure_bitwise(tested, probes, rows, required=True)
    onnx_file = manifest.file("onnx")
    assert onnx_file is not None
    ran = placements(version_dir / onnx_file.path, device, probes)
    compute = sorted(set().union(*(p for op, p in ran.items() if op in COMPUTE_OPS)))
    return DeviceCheck(
        model=manifest.name,
        version=manifest.version,
        device=tested.device,
        compute_providers=compute,
        max_abs_diff=float(np.abs(actual - expected).max(initial=0.0)),
        max_rel_diff=max_relative_diff(actual, expected),
        atol=atol,
        rtol=rtol,
        within_tolerance=within_tolerance(actual, expected, atol, rtol),
        load_checks=load_checks,
        invariance_max_diff=invariance,
        bitwise_invariant=bits.invariant,
        bitwise_max_rows=bits.max_rows,
        bitwise_note=bits.note,
    )


def time_case(version_dir: Path, batch: int, device: Device, seconds: float) -> Timing:
    """Median time of one run of ``batch`` rows (golden inputs repeated), after a warm-up."""
    manifest = read_manifest(version_dir)
    runner = backend(version_dir, device)
    probes = golden_inputs(manifest)
    x = np.ascontiguousarray(np.resize(probes, (batch, *probes.shape[1:])))
    for _ in range(20):  # first runs allocate (and, on a GPU, pick kernels)
        runner.run(x)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        runner.run(x)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return Timing(manifest.name, batch, runner.device, median * 1e6, batch / median)


@contextlib.contextmanager
def server(store: Path, device: Device) -> Iterator[str]:
    """foldserve on ``device`` on a free loopback port, in this process; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    settings = Settings(model_store=store, device=device, log_level="warning")
    running, thread = run_in_thread(create_app(settings), settings, sock)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                models = httpx.get(f"{base}/models").json()["models"]
                if all(v["status"] != "loading" for m in models for v in m["versions"]):
                    break
            assert time.monotonic() < deadline and thread.is_alive(), "server did not load"
            time.sleep(0.05)
        yield base
    finally:
        running.request_stop()
        thread.join(30)
        sock.close()


def serve_cases(store: Path, device: Device, requests: int) -> list[Served]:
    """Each case over HTTP, one connection, every answer checked against the golden outputs."""
    found = []
    with server(store, device) as base, httpx.Client(base_url=base, timeout=30) as client:
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        for model, batch in CASES:
            (ready,) = [v for v in models[model]["versions"] if v["status"] == "ready"][-1:]
            assert ready["device"] == device, f"{model} runs on {ready['device']}, not {device}"
            manifest = read_manifest(latest(store, model))
            golden_in = np.asarray(manifest.golden.inputs, dtype=np.float32)
            golden_out = np.asarray(manifest.golden.outputs, dtype=np.float32)
            # The golden samples repeated up to the case's rows, flat as /predict takes them.
            golden_in = np.resize(golden_in, (batch, golden_in.shape[1]))
            golden_out = np.resize(golden_out, (batch, golden_out.shape[1]))
            body = json.dumps({"inputs": golden_in.tolist()})
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                answer = client.post(f"/models/{model}/predict", content=body)
                times.append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
            outputs = np.asarray(answer.json()["outputs"], dtype=np.float32)
            tolerance = manifest.verification
            assert within_tolerance(outputs, golden_out, tolerance.atol, tolerance.rtol), model
            ms = sorted(t * 1e3 for t in times)
            p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
            found.append(Served(model, batch, device, requests, statistics.median(ms), p99))
    return found


def table(
    checks: dict[str, DeviceCheck],
    timings: list[Timing],
    served: list[Served],
    device: str,
    reference: str,
) -> str:
    """One markdown row per case: speed on both devices, then the device's agreement and
    batch invariance (per model, repeated on its rows)."""
    at = {(t.model, t.batch, t.device): t for t in timings}
    http = {(s.model, s.batch, s.device): s for s in served}
    head = (
        f"| case | {device}: arithmetic ran on | {reference} us/run | {device} us/run | "
        f"{device} samples/s | "
        f"{reference} HTTP p50/p99 ms | {device} HTTP p50/p99 ms | {device} vs {reference}: "
        f"max abs diff (rel) | within tolerance | batch invariance on {device}: max diff | "
        f"bitwise (up to rows) |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for model, batch in CASES:
        check = checks[model]
        ref, dev = at[(model, batch, reference)], at[(model, batch, device)]
        ref_http, dev_http = http[(model, batch, reference)], http[(model, batch, device)]
        bitwise = {True: "yes", False: "no", None: "not measured"}[check.bitwise_invariant]
        agrees = "yes" if check.within_tolerance else "NO"
        invariance = (
            "load checks FAILED"
            if check.invariance_max_diff is None
            else f"{check.invariance_max_diff:.3g}"
        )
        lines.append(
            f"| {model.removeprefix('digits-')}x{batch} | {', '.join(check.compute_providers)} | "
            f"{ref.median_us:,.1f} | "
            f"{dev.median_us:,.1f} | {dev.samples_per_s:,.0f} | "
            f"{ref_http.p50_ms:.2f} / {ref_http.p99_ms:.2f} | "
            f"{dev_http.p50_ms:.2f} / {dev_http.p99_ms:.2f} | "
            f"{check.max_abs_diff:.3g} ({check.max_rel_diff:.2g}) | "
            f"{agrees} (atol {check.atol:g}, rtol {check.rtol:g})"
            f" | {invariance} | {bitwise} ({check.bitwise_max_rows}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--reference", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--store", type=Path, default=STORE)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per case and device")
    parser.add_argument("--requests", type=int, default=300, help="HTTP requests per case")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    device, reference = args.device, args.reference
    devices = list(dict.fromkeys([reference, device]))
    models = list(dict.fromkeys(model for model, _ in CASES))
    checks = {m: check_device(latest(args.store, m), device, reference) for m in models}
    timings = [
        time_case(latest(args.store, model), batch, d, args.seconds)
        for d in devices
        for model, batch in CASES
    ]
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "store"
        shutil.copytree(args.store, store)  # the server never writes, but it gets its own copy
        served = [s for d in devices for s in serve_cases(store, d, args.requests)]
    print(table(checks, timings, served, device, reference))
    for check in checks.values():
        print(
            f"{check.model} v{check.version} on {check.device}: load checks {check.load_checks}; "
            f"bitwise {check.bitwise_note}"
        )
    if args.json:
        figures: dict[str, Any] = {
            "checks": [asdict(c) for c in checks.values()],
            "timings": [asdict(t) for t in timings],
            "served": [asdict(s) for s in served],
        }
        args.json.write_text(json.dumps(figures, indent=2))
    expected = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[device]
    wrong_device = [
        c.model for c in checks.values() if c.device != device or c.compute_providers != [expected]
    ]
    disagree = [
        c.model for c in checks.values() if not c.within_tolerance or c.load_checks != "passed"
    ]
    if wrong_device or disagree:
        print(f"FAIL: ran elsewhere than {device}: {wrong_device}; checks failed: {disagree}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
