"""A bounded soak: mixed good and bad traffic across the shipped models against a real server.

Good requests (digits-mlp and digits-cnn, /predict and V2, 1-8 samples from the manifests' golden
inputs) must come back 200 with the golden outputs; bad ones (broken JSON, wrong shapes, NaN,
unknown models, wrong methods, oversized bodies, odd versions and headers, clients that hang up
mid-body) must come back 4xx, never 5xx, and never disturb the good ones. The server's RSS is
read before and after. Run by tests/service/test_soak.py (short) and `scripts/soak` (a minute).

    python -m tests.service.soak --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from tests.service.server_process import until_ready

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("digits-mlp", "digits-cnn")


@dataclass
class SoakReport:
    seconds: float = 0.0
    sent: int = 0
    good_ok: int = 0
    wrong_answers: int = 0
    unexpected: list[str] = field(default_factory=list)  # 5xx, or a bad request not refused
    statuses: Counter[int] = field(default_factory=Counter)
    rss_mib_before: float = 0.0
    rss_mib_after: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"duration: {self.seconds:.0f} s, requests sent: {self.sent}",
            f"good requests answered correctly: {self.good_ok}, wrong answers: "
            f"{self.wrong_answers}, unexpected statuses: {len(self.unexpected)}",
            f"statuses: {dict(sorted(self.statuses.items()))}",
            f"server RSS: {self.rss_mib_before:.1f} MiB after warm-up, "
            f"{self.rss_mib_after:.1f} MiB at the end",
        ]


def golden(store: Path, model: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    manifest = json.loads((store / model / "1" / "manifest.json").read_text())
    shape = tuple(manifest["inputs"][0]["shape"])
    inputs = np.asarray(manifest["golden"]["inputs"], dtype=np.float32).reshape(-1, *shape)
    outputs = np.asarray(manifest["golden"]["outputs"], dtype=np.float32)
    return inputs, outputs, shape


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Traffic:
    """Draws requests: two thirds good, one third bad, each kind with what it must get."""

    def __init__(self, store: Path, seed: int) -> None:
        self.rng = random.Random(seed)
        self.golden = {model: golden(store, model) for model in MODELS}

    def good(self) -> tuple[str, str, dict[str, str], bytes, str, np.ndarray]:
        model = self.rng.choice(MODELS)
        inputs, outputs, _ = self.golden[model]
        picks = [self.rng.randrange(len(inputs)) for _ in range(self.rng.randint(1, 8))]
        x, expected = inputs[picks], outputs[picks]
        if self.rng.random() < 0.5:
            body = json.dumps({"inputs": x.tolist()}).encode()
            return "POST", f"/models/{model}/predict", _JSON, body, "predict", expected
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
        body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
        return "POST", f"/v2/models/{model}/infer", _JSON, body, "v2", expected

    def bad(self) -> tuple[str, str, dict[str, str], bytes]:
        model = self.rng.choice(MODELS)
        kinds = [
            ("POST", f"/models/{model}/predict", _JSON, b'{"inputs": [[1, 2'),
            ("POST", f"/models/{model}/predict", _JSON, b'{"inputs": [[1, 2, 3]]}'),
            ("POST", f"/models/{model}/predict", _JSON, b'{"inputs": [[NaN]]}'),
            ("POST", f"/models/{model}/predict", _JSON, b'{"inputs": [["a"]]}'),
            ("POST", f"/models/{model}/predict", _JSON, b'{"inputs": 5}'),
            ("POST", f"/models/{model}/predict", _JSON, b'{"outputs": []}'),
            ("POST", "/models/no-such-model/predict", _JSON, b'{"inputs": [[0]]}'),
            ("POST", f"/models/{model}/versions/99/predict", _JSON, b'{"inputs": [[0]]}'),
            ("POST", f"/models/{model}/versions/{'9' * 5000}/predict", _JSON, b"{}"),
            ("POST", f"/models/{model}/predict", _JSON, b'{"inputs": [[1e39]]}'),
            ("GET", f"/models/{model}/predict", {}, b""),
            ("POST", f"/v2/models/{model}/infer", _JSON, b'{"inputs": []}'),
            ("POST", f"/v2/models/{model}/infer", {**_JSON, "X-Request-Timeout": "soon"}, b"{}"),
            (
                "POST",
                f"/models/{model}/predict",
                {"Content-Type": "text/plain"},
                b'{"inputs":[[0]]}',
            ),
            ("POST", f"/models/{model}/predict", _JSON, b'{"inputs": [[true, 0, 5]]}'),
            ("POST", f"/models/{model}/predict", _JSON, b'{"inputs": [[0]], "inputs": [[1]]}'),
            ("POST", f"/models/{model}/versions/01/predict", _JSON, b'{"inputs": [[0]]}'),
            ("POST", f"/models/{model}/predict", {**_JSON, "Content-Encoding": "br"}, b"{}"),
        ]
        if self.rng.random() < 0.01:  # rare: each one moves 65 MiB over loopback
            return "POST", f"/models/{model}/predict", _JSON, b" " * (65 << 20)
        return self.rng.choice(kinds)


_JSON = {"Content-Type": "application/json"}


async def _one(client: httpx.AsyncClient, traffic: Traffic, report: SoakReport) -> None:
    good = traffic.rng.random() < 2 / 3
    if good:
        method, path, headers, body, route, expected = traffic.good()
    else:
        method, path, headers, body = traffic.bad()
    try:
        response = await client.request(method, path, headers=headers, content=body)
    except httpx.TransportError as exc:
        # The server may close a connection after refusing an oversized body before reading
        # it; any other transport failure is unexpected.
        if good or len(body) < (1 << 20):
            report.unexpected.append(f"{method} {path[:60]}: {type(exc).__name__}")
        return
    report.sent += 1
    report.statuses[response.status_code] += 1
    if good:
        if response.status_code != 200:
            report.unexpected.append(f"good {path}: {response.status_code} {response.text[:200]}")
            return
        data = response.json()
        if route == "predict":
            outputs = np.asarray(data["outputs"], dtype=np.float32)
        else:
            outputs = np.asarray(data["outputs"][0]["data"], dtype=np.float32)
        outputs = outputs.reshape(expected.shape)
        if np.abs(outputs - expected).max() <= 1e-4:
            report.good_ok += 1
        else:
            report.wrong_answers += 1
    elif not 400 <= response.status_code < 500:
        report.unexpected.append(f"bad {method} {path[:60]}: {response.status_code}")


async def soak(base: str, store: Path, seconds: float, clients: int, seed: int) -> SoakReport:
    traffic = Traffic(store, seed)
    report = SoakReport()
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            while time.monotonic() < deadline:
                await _one(client, traffic, report)

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    report.seconds = time.monotonic() - started
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_against_a_server(
    store: Path, seconds: float, clients: int = 8, seed: int = 0
) -> SoakReport:
    """Start `foldserve serve` on ``store``, warm it up, soak it, and read its memory."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FOLDSERVE_")}
    env["FOLDSERVE_GRPC"] = "false"  # its own port: off, as in every test server
    env["FOLDSERVE_LOG_LEVEL"] = "warning"
    command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--model-store", str(store)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        until_ready(base, server)
        asyncio.run(soak(base, store, min(2.0, seconds / 5), clients, seed + 1))  # warm-up
        before = rss_mib(server.pid)
        report = asyncio.run(soak(base, store, seconds, clients, seed))
        report.rss_mib_before, report.rss_mib_after = before, rss_mib(server.pid)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    if b"Traceback" in stderr:
        report.unexpected.append("a traceback in the server log: " + stderr.decode()[-2000:])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.service.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store")
    args = parser.parse_args()
    report = run_against_a_server(args.store, args.seconds, args.clients)
    print("\n".join(report.lines()))
    for line in report.unexpected[:20]:
        print("UNEXPECTED:", line)
    return 0 if not report.unexpected and not report.wrong_answers else 1


if __name__ == "__main__":
    raise SystemExit(main())
