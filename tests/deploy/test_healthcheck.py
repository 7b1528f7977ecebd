"""docker/healthcheck.py, the images' HEALTHCHECK: 0 only while /readyz answers 200."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from service.app import create_app
from service.settings import Settings
from tests.deploy.conftest import ROOT, STORE
from tests.service.conftest import running

SCRIPT = ROOT / "docker" / "healthcheck.py"


def check(port: int) -> int:
    env = {**os.environ, "FOLDSERVE_PORT": str(port)}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, timeout=10).returncode


def test_healthy_only_once_the_default_model_is_ready(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(STORE, store)
    with running(create_app(Settings(model_store=store))) as (base, _):
        assert check(int(base.rsplit(":", 1)[1])) == 0
    # A server up but not ready (its default model is missing) is not healthy.
    app = create_app(Settings(model_store=store, default_model="missing"))
    with running(app) as (base, _):
        assert check(int(base.rsplit(":", 1)[1])) == 1


def test_unhealthy_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        assert check(port) == 1
