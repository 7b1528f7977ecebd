"""Waiting for a `foldserve serve` started as its own process (no torch, no fixtures: the soak
script imports it too)."""

from __future__ import annotations

import subprocess
import time

import httpx


def until_ready(base: str, server: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once ``base``/readyz answers 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"the server exited with {server.returncode}"
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
