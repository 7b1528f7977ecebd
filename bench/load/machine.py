"""What the run ran on: the machine and the versions of what was measured."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = (
    "foldserve", "onnxruntime", "fastapi", "starlette", "uvicorn", "uvloop", "httptools",
    "orjson", "numpy", "torch", "litserve",
)  # fmt: skip


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
        "loadavg_at_start": loadavg(),
    }


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: above 2 on this 2-core machine, it is shared."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def code(root: Path) -> dict[str, Any]:
    """The commit measured, and which of the server's files differed from it at the start."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip()

    changed = git("status", "--porcelain", "--", "service", "pyproject.toml").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_server_files": changed}
