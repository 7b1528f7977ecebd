"""A server under test as a process group: start, wait until ready, CPU and RSS, stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

from load import procfs
from load.cases import BENCH, ROOT
from load.servers import Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Running:
    """One server under test, in its own process group so it can be stopped whole."""

    def __init__(self, server: Server, logdir: Path) -> None:
        self.server = server
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = logdir / f"{server.name}.log"
        env = {**os.environ, **server.env, "PYTHONPATH": str(BENCH)}
        # Each foldserve its own gRPC port: several run side by side (8001 is the default).
        self.grpc_port = free_port() if server.is_foldserve else None
        if self.grpc_port is not None:
            env["FOLDSERVE_GRPC_PORT"] = str(self.grpc_port)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*server.argv, "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 90.0) -> float:
        started = time.monotonic()
        ready_workers: set[int] = set()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.server.name} exited ({self.proc.returncode}); see {self.log}"
                )
            with contextlib.suppress(OSError, ValueError, KeyError):
                if not self.server.is_foldserve:
                    if http("GET", self.base + "/readyz", timeout=1)[0] == 200:
                        return time.monotonic() - started
                elif (pid := self._ready_worker()) is not None:
                    ready_workers.add(pid)
                    if len(ready_workers) >= self.server.processes:
                        return time.monotonic() - started
            time.sleep(0.05 if ready_workers else 0.2)
        raise RuntimeError(f"{self.server.name} not ready after {timeout:.0f} s; see {self.log}")

    def _ready_worker(self) -> int | None:
        """The pid of the foldserve worker a fresh connection reached, if all its models are ready.

        NOTE: one connection for both questions: each connection belongs to one worker process,
        and with --workers the load must not start while one of them is still loading.
        """
        conn = HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/models")
            response = conn.getresponse()
            body = json.loads(response.read())
            states = [v["status"] for m in body["models"] for v in m["versions"]]
            if response.status != 200 or len(states) < 2 or any(s != "ready" for s in states):
                return None
            conn.request("GET", "/healthz")
            pid: int = json.loads(conn.getresponse().read())["pid"]
            return pid
        finally:
            conn.close()

    def pids(self) -> list[int]:
        """Every process of the server's session (uvicorn workers, LitServe's workers)."""
        return procfs.session_pids(self.proc.pid)

    def cpu_seconds(self) -> float:
        return procfs.cpu_seconds(self.pids())

    def rss_mib(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak) of the server's main process, MiB."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # LitServe's worker processes can outlive their parent: end whatever is left of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(servers: list[Server], logdir: Path) -> Iterator[dict[str, Running]]:
    """Start the servers side by side, wait until all are ready, stop them all at the end."""
    runs: dict[str, Running] = {}
    try:
        for server in servers:
            runs[server.name] = Running(server, logdir)
        for run in runs.values():
            run.wait_ready()
        yield runs
    finally:
        for run in runs.values():
            run.stop()
