"""Smoke test of the plain install, run by scripts/test with the torch-free .venv-serve python.

Starts `foldserve serve` exactly as the README does, waits for readiness, and checks that the
default model answers its own golden inputs; then `foldserve import` folds and stores an ONNX
graph, which needs no torch either. Standard library (and the serving install's onnx and numpy)
only: this venv has no test tools.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "digits-mlp"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: object | None = None) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def latest_manifest() -> dict[str, object]:
    model_root = ROOT / "model_store" / DEFAULT_MODEL
    version = max(int(p.name) for p in model_root.iterdir() if p.name.isdigit())
    return dict(json.loads((model_root / str(version) / "manifest.json").read_text()))


def check_import_without_torch() -> int:
    """`foldserve import` on a Gemm -> BatchNormalization graph: folded, verified, stored."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(size=(6, 4)),
        "c": rng.normal(size=4),
        "scale": rng.uniform(0.5, 2, size=4),
        "bias": rng.normal(size=4),
        "mean": rng.normal(size=4),
        "var": rng.uniform(0.5, 2, size=4),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="dense"),
            helper.make_node(
                "BatchNormalization", ["h", "scale", "bias", "mean", "var"], ["y"], name="bn"
            ),
        ],
        "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in arrays.items()],
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "net.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        command = [str(Path(sys.executable).parent / "foldserve"), "import", str(path)]
        store = Path(folder) / "store"
        done = subprocess.run(
            [*command, "--store", str(store), "--name", "smoke"], capture_output=True, text=True
        )
        manifest = store / "smoke" / "1" / "manifest.json"
        if done.returncode != 0 or not manifest.is_file():
            print(f"FAIL: foldserve import: {done.returncode} {done.stderr}", file=sys.stderr)
            return 1
        placement = json.loads(manifest.read_text())["batch_norm"][0]["placement"]
    print(f"ok: plain install (no torch) imported an ONNX graph, its BN {placement}")
    return 0


def main() -> int:
    if importlib.util.find_spec("torch") is not None:
        print("FAIL: torch is importable in the plain serving install", file=sys.stderr)
        return 1
    if check_import_without_torch() != 0:
        return 1
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "foldserve"), "serve", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "FOLDSERVE_LOG_LEVEL": "warning"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = http("GET", f"{base}/readyz")
                if status == 200:
                    break
            except OSError:
                status, body = 0, {}
            if time.monotonic() > deadline or server.poll() is not None:
                print(f"FAIL: server never became ready: {status} {body}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        manifest = latest_manifest()
        golden = manifest["golden"]
        assert isinstance(golden, dict)
        status, body = http("POST", f"{base}/predict", {"inputs": golden["inputs"]})
        if status != 200:
            print(f"FAIL: /predict answered {status}: {body}", file=sys.stderr)
            return 1
        outputs, expected = body["outputs"], golden["outputs"]
        assert isinstance(outputs, list) and isinstance(expected, list)
        worst = max(
            abs(a - b)
            for row, ref in zip(outputs, expected, strict=True)
            for a, b in zip(row, ref, strict=True)
        )
        if worst > 1e-4:
            print(f"FAIL: outputs differ from the golden ones by {worst}", file=sys.stderr)
            return 1
        print(
            f"ok: plain install (no torch) served {DEFAULT_MODEL} v{body['version']}, "
            f"max diff {worst:.2g}"
        )
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
