"""bench/transport_cost.py (docs/performance.md cites it) runs as documented, answers every
call of both connection layers, and prints a figure for each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_transport_cost_script_measures_both_layers() -> None:
    done = subprocess.run(
        [sys.executable, "bench/transport_cost.py", "--calls", "200", "--rounds", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for layer in ("http/1.1 (REST)", "http/2 (gRPC)"):
        row = re.search(rf"\| {re.escape(layer)} \| ([\d.]+) / ([\d.]+) \|", done.stdout)
        assert row is not None, done.stdout
        assert all(float(v) > 0 for v in row.groups())
