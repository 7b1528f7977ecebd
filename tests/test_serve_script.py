"""scripts/serve runs the code of the checkout it runs from, as it is now: its environment holds
an editable install, so an edit is served at the next start with nothing reinstalled.

Tried on a checkout of a stand-in project (the real one installs onnxruntime and friends, a
minute): the scripts as they are, a package named as ours whose command prints a value read from
a module the test then edits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "foldserve"
version = "0.0.0"
requires-python = ">=3.11"

[project.scripts]
foldserve = "service.cli:main"

[tool.setuptools.packages.find]
include = ["service*"]
"""
CLI = """\
import sys

from service import answer


def main() -> None:
    print(answer.VALUE, *sys.argv[1:])
"""


def serve(checkout: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return subprocess.run(
        [str(checkout / "scripts" / "serve"), "--port", "9"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_scripts_serve_serves_the_checkout_as_it_is_now(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for script in ("serve", "_venv.sh"):
        shutil.copy2(ROOT / "scripts" / script, checkout / "scripts" / script)
    (checkout / "pyproject.toml").write_text(PYPROJECT)
    (checkout / "constraints.txt").write_text("")
    package = checkout / "service"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text(CLI)
    (package / "answer.py").write_text("VALUE = 'as first written'\n")
    # What the old script left: an environment stamped for this pyproject.toml, holding a copy
    # of the code as it was when installed (no editable hook). It must be made again.
    old = checkout / ".venv-serve"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(old)], check=True)
    pins = (checkout / "pyproject.toml").read_bytes() + b""  # + constraints.txt, empty
    (old / ".foldserve-stamp").write_text(hashlib.sha256(pins).hexdigest()[:16] + "-\n")

    first = serve(checkout)
    if first.returncode != 0 and any(
        sign in first.stderr for sign in ("NewConnectionError", "No matching distribution")
    ):
        pytest.skip(f"package registry unreachable: {first.stderr.strip().splitlines()[-1]}")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "as first written serve --port 9\n"
    assert "setting up .venv-serve" in first.stderr

    (package / "answer.py").write_text("VALUE = 'after an edit'\n")  # an edit, or a pull
    second = serve(checkout)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "after an edit serve --port 9\n"
    assert second.stderr == ""  # nothing set up again
