"""The worker supervisor's sockets and its refusal to restart workers that cannot start."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.errors import ConfigError
from service.workers import (
    METRICS_DIR_PREFIX,
    Supervisor,
    listening_sockets,
    metrics_dir_prefix,
    sweep_stale_metrics_dirs,
)


def test_sockets_share_the_port_the_kernel_picked_and_take_connections() -> None:
    sockets = listening_sockets("127.0.0.1", 0, 3, backlog=16)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and ports != {0}
        (port,) = ports
        for _ in range(6):  # connections land on the sockets' accept queues, whichever
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_taken_by_another_program_is_a_config_error() -> None:
    with socket.socket() as other:  # no SO_REUSEPORT: nobody may share its port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            listening_sockets("127.0.0.1", port, 2, backlog=16)


def exit_at_once(sock: socket.socket, parent_pid: int) -> None:
    raise SystemExit(3)  # as a worker does when the app fails to start


def test_workers_that_keep_failing_at_start_end_the_server() -> None:
    sockets = listening_sockets("127.0.0.1", 0, 2, backlog=16)
    supervisor = Supervisor(sockets, stop_timeout_s=5, target=exit_at_once)
    started = time.monotonic()
    assert supervisor.run() == 1
    assert time.monotonic() - started < 30
    assert all(sock.fileno() == -1 for sock in sockets)  # closed on the way out


def test_metrics_folders_of_killed_servers_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(gone.stdout)  # exited: its folder is litter
    stale = tmp_path / f"{METRICS_DIR_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{metrics_dir_prefix()}def"  # this process: alive
    other = tmp_path / "foldserve-metrics-notapid-x"
    for folder in (stale, live, other):
        (folder / "counter_1.db").parent.mkdir()
        (folder / "counter_1.db").write_bytes(b"x")
    assert sweep_stale_metrics_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
