"""Smoke test of the plain install, run by scripts/test with the torch-free .venv-serve python.

Starts `foldserve serve` exactly as the README does, waits for readiness, and checks that the
default model answers its own golden inputs. Standard library only: this venv has no test tools.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
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


def main() -> int:
    if importlib.util.find_spec("torch") is not None:
        print("FAIL: torch is importable in the plain serving install", file=sys.stderr)
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
