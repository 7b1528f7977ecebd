"""Load benchmark: foldserve against its baselines, on loopback, every answer checked.

For each server: start it on a free port, wait until it is ready, check the golden inputs against
the manifests' golden outputs (atol 1e-4), then for each case (model x samples per request) and
concurrency: warm up, drive it with wrk for a fixed time (bench/post.lua checks every answer's
predictions), and record requests/s, samples/s, p50/p99, errors, and the CPU that wrk and the
server used. In the same run: in-process onnxruntime (the compute limit), the batcher's cost at
concurrency 1 (in-process, against calling the backend directly), the RSS of a foldserve process
with both models loaded, and a py-spy profile of foldserve under load. Prints a markdown table and
the targets, writes bench/results/<timestamp>.json and .png. Run it through bench/run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
STORE = ROOT / "model_store"
RESULTS = BENCH / "results"
PY = sys.executable
BIN = Path(PY).parent
ATOL = 1e-4
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Case:
    model: str
    samples: int  # per request
    protocol: str = "predict"  # or "v2bin": KServe V2 infer, binary tensors in and out

    @property
    def key(self) -> str:
        prefix = "" if self.protocol == "predict" else f"{self.protocol}-"
        return f"{prefix}{self.model.removeprefix('digits-')}x{self.samples}"

    def path(self) -> str:
        if self.protocol == "v2bin":
            return f"/v2/models/{self.model}/infer"
        return f"/models/{self.model}/predict"


@dataclass(frozen=True)
class Server:
    name: str
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cases: tuple[str, ...] | None = None  # case keys; None: all
    concurrency: tuple[int, ...] | None = None  # None: all
    checks_outputs: bool = True  # the bare endpoint answers a constant
    samples_in_answer: bool = True  # the bare endpoint answers one sample whatever it is sent
    speaks_v2: bool = False  # serves the KServe V2 protocol (the v2bin case)
    processes: int = 1  # foldserve workers that must each be ready before the load starts


def servers() -> list[Server]:
    foldserve = [str(BIN / "foldserve"), "serve", "--model-store", str(STORE)]
    quiet = {"FOLDSERVE_LOG_LEVEL": "warning"}
    module = [PY, "-m"]
    return [
        Server("foldserve", "foldserve, 1 process", foldserve, quiet, speaks_v2=True),
        Server(
            "foldserve-w2",
            "foldserve --workers 2",
            [*foldserve, "--workers", "2"],
            quiet,
            cases=("mlpx1", "mlpx64", "cnnx1"),
            processes=2,
        ),
        Server(
            "foldserve-delay0",
            "foldserve, max_delay_ms=0",
            foldserve,
            {**quiet, "FOLDSERVE_MAX_DELAY_MS": "0"},
            cases=("mlpx1",),
            concurrency=(1, 64),
        ),
        Server(
            "bare",
            "bare FastAPI, no parse (web-stack limit)",
            [*module, "servers.bare"],
            cases=("mlpx1", "mlpx64"),
            checks_outputs=False,
            samples_in_answer=False,
        ),
        Server(
            "torch-eager",
            "naive FastAPI + pydantic + torch eager",
            [*module, "servers.torch_eager"],
        ),
        Server(
            "litserve",
            "LitServe + onnxruntime, batching 64 / 2 ms",
            [*module, "servers.litserve_onnx"],
        ),
    ]


# ---------------------------------------------------------------- data for the cases


def manifest(model: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((STORE / model / "1" / "manifest.json").read_text())
    return data


def case_data(case: Case) -> tuple[bytes, str, int | None]:
    """The request body, the substring every answer to it must hold, and for a binary V2 body
    the length of its JSON header (``Inference-Header-Content-Length``)."""
    m = manifest(case.model)
    golden_in, golden_out = m["golden"]["inputs"], np.asarray(m["golden"]["outputs"])
    rows = [golden_in[i % len(golden_in)] for i in range(case.samples)]
    if case.protocol == "v2bin":
        return v2_binary_body(m, np.asarray(rows, dtype="<f4"))
    labels = [
        m["labels"][int(np.argmax(golden_out[i % len(golden_in)]))] for i in range(case.samples)
    ]
    body = json.dumps({"inputs": rows}, separators=(",", ":")).encode()
    return body, '"predictions":[' + ",".join(f'"{x}"' for x in labels) + "]", None


def v2_binary_body(m: dict[str, Any], x: np.ndarray) -> tuple[bytes, str, int]:
    """A KServe V2 binary request as tritonclient sends it: JSON header, then raw float32.

    The answer's outputs are raw bytes too, so wrk checks only the status and the output's size
    in the answer's JSON header; check_v2_golden decodes a whole answer before each load run.
    """
    spec, out = m["inputs"][0], m["outputs"][0]
    x = x.reshape(len(x), *spec["shape"])
    tensor = {
        "name": spec["name"],
        "shape": list(x.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": x.nbytes},
    }
    header = {"inputs": [tensor], "parameters": {"binary_data_output": True}}
    head = json.dumps(header, separators=(",", ":")).encode()
    out_bytes = len(x) * int(np.prod(out["shape"])) * 4
    return head + x.tobytes(), f'"binary_data_size":{out_bytes}', len(head)


def bare_expectation() -> str:
    m = manifest("digits-mlp")
    label = m["labels"][int(np.argmax(m["golden"]["outputs"][0]))]
    return f'"predictions":["{label}"]'


# ---------------------------------------------------------------- processes


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
                if not self.server.name.startswith("foldserve"):
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
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == self.proc.pid:  # session id
                    found.append(int(stat.parent.name))
        return found

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / CLK_TCK

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


def rss_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


# ---------------------------------------------------------------- checks and load


def check_golden(run: Running, model: str) -> float | None:
    """Max |answer - golden| over the manifest's golden inputs; raises when it exceeds ATOL."""
    if not run.server.checks_outputs:
        return None
    m = manifest(model)
    body = json.dumps({"inputs": m["golden"]["inputs"]}).encode()
    status, answer = http("POST", f"{run.base}/models/{model}/predict", body, timeout=30)
    if status != 200:
        raise RuntimeError(
            f"{run.server.name} {model}: golden request got {status}: {answer[:200]!r}"
        )
    got = np.asarray(json.loads(answer)["outputs"], dtype=np.float64)
    diff = float(np.abs(got - np.asarray(m["golden"]["outputs"])).max())
    if diff > ATOL:
        raise RuntimeError(
            f"{run.server.name} {model}: golden outputs differ by {diff:.3g} > {ATOL}"
        )
    return diff


def wrk(
    url: str,
    body_file: Path,
    expect: str,
    connections: int,
    seconds: float,
    header_length: int | None = None,
) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # NOTE: wrk takes whole seconds only.
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "post.lua"),
        url,
        "--",
        str(body_file),
        expect,
        *([] if header_length is None else [str(header_length)]),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {(out.stdout + out.stderr).strip()[:300]}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["wrk_cpu_cores"] = cpu / (result["duration_us"] / 1e6)
    return result


def check_v2_golden(url: str, body: bytes, header_length: int, case: Case) -> None:
    """Send the binary V2 body once and compare the decoded raw outputs with the golden ones."""
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        length = int(resp.headers["Inference-Header-Content-Length"])
        answer = resp.read()
    (output,) = json.loads(answer[:length])["outputs"]
    got = np.frombuffer(answer[length:], dtype="<f4").reshape(output["shape"])
    golden = np.asarray(manifest(case.model)["golden"]["outputs"])
    want = golden[np.arange(case.samples) % len(golden)]
    diff = float(np.abs(got - want).max())
    if diff > ATOL:
        raise RuntimeError(f"{case.key}: V2 binary outputs differ from golden by {diff:.3g}")


@dataclass
class Measurement:
    server: str
    case: str
    model: str
    samples_per_request: int
    concurrency: int
    requests_per_s: float
    samples_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int  # non-200, socket errors, timeouts and answers with wrong predictions
    requests: int
    wrk_cpu_cores: float
    server_cpu_cores: float
    golden_max_abs_diff: float | None
    status_codes: dict[str, int] = field(default_factory=dict)


def measure(
    run: Running, case: Case, c: int, seconds: float, warmup: float, tmp: Path, golden: float | None
) -> Measurement:
    body, expect, header_length = case_data(case)
    if not run.server.samples_in_answer:
        expect = bare_expectation()
    body_file = tmp / f"{case.key}.body"
    body_file.write_bytes(body)
    url = run.base + case.path()
    if header_length is not None:
        check_v2_golden(url, body, header_length, case)
    if warmup > 0:
        wrk(url, body_file, expect, c, warmup, header_length)
        # NOTE: wrk drops its connections with requests in flight; a server may still compute
        # those (and hold their queue rows). Let it drain so the measurement sees steady state.
        time.sleep(0.5)
    cpu0 = run.cpu_seconds()
    r = wrk(url, body_file, expect, c, seconds, header_length)
    server_cpu = (run.cpu_seconds() - cpu0) / (r["duration_us"] / 1e6)
    e = r["errors"]
    errors = (
        max(r["bad_answers"], e["status"]) + e["connect"] + e["read"] + e["write"] + e["timeout"]
    )
    rps = r["requests"] / (r["duration_us"] / 1e6)
    lat = r["latency_us"]
    return Measurement(
        run.server.name,
        case.key,
        case.model,
        case.samples,
        c,
        rps,
        rps * case.samples,
        lat["p50"] / 1e3,
        lat["p99"] / 1e3,
        lat["mean"] / 1e3,
        errors,
        r["requests"],
        r["wrk_cpu_cores"],
        server_cpu,
        golden,
        r["status_codes"],
    )


# ---------------------------------------------------------------- in-process references


def inprocess_onnxruntime(models: list[str], seconds: float) -> dict[str, dict[str, float]]:
    """session.run in a loop, with foldserve's session options: the compute limit."""
    from service.backends import BackendOptions
    from service.backends.onnx import OnnxBackend

    out: dict[str, dict[str, float]] = {}
    for model in models:
        backend = OnnxBackend(STORE / model / "1" / "model.onnx", BackendOptions("cpu", 1))
        shape = tuple(manifest(model)["inputs"][0]["shape"])
        golden = np.asarray(manifest(model)["golden"]["inputs"], dtype=np.float32)
        for batch in (1, 64):
            x = np.resize(golden, (batch, golden.shape[1])).reshape(batch, *shape)
            for _ in range(50):
                backend.run(x)
            times = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                backend.run(x)
                times.append(time.perf_counter() - t)
            per_call = statistics.median(times)
            out[f"{model}/batch{batch}"] = {
                "batch": batch,
                "calls": len(times),
                "median_call_us": per_call * 1e6,
                "calls_per_s": len(times) / sum(times),
                "samples_per_s": batch * len(times) / sum(times),
            }
    return out


def _timed(fn: Any, arg: Any) -> float:
    started = time.perf_counter()
    fn(arg)
    return time.perf_counter() - started


def batcher_overhead(model: str, calls: int) -> dict[str, float]:
    """p50 of one lone request through Batcher.submit vs calling the backend directly.

    Concurrency 1 in-process: each call waits for the previous. "default" is the batcher as the
    server builds it by default (the manifest's delay, adaptive delay on, inline when a full
    batch is faster than Settings.inline_max_ms); "delay0" is a worker-thread batcher with no
    wait: only its machinery (queue, executor hop, future) remains.
    """
    from service.backends import BackendOptions
    from service.backends.onnx import OnnxBackend
    from service.batching import Batcher
    from service.settings import Settings

    backend = OnnxBackend(STORE / model / "1" / "model.onnx", BackendOptions("cpu", 1))
    x = np.asarray(manifest(model)["golden"]["inputs"][:1], dtype=np.float32)
    default_delay = float(manifest(model)["batching"]["max_delay_ms"])

    def direct() -> float:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            backend.run(x)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    defaults = Settings()
    full = np.resize(x, (64, *x.shape[1:]))
    full_batch_ms = min(_timed(backend.run, full) for _ in range(5)) * 1e3
    inline = full_batch_ms < defaults.inline_max_ms

    async def through(delay_ms: float, adaptive: bool, inline: bool) -> float:
        batcher = Batcher(
            backend.run,
            max_batch_size=64,
            max_delay_ms=delay_ms,
            max_queue_rows=4096,
            adaptive_delay=adaptive,
            inline=inline,
        )
        await batcher.start()
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            await batcher.submit(x)
            times.append(time.perf_counter() - t)
        await batcher.stop()
        return statistics.median(times)

    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    direct()  # warm up
    base = direct()
    zero = run(through(0.0, False, False))
    default = run(through(default_delay, defaults.adaptive_delay, inline))
    return {
        "model": model,
        "calls": calls,
        "default_max_delay_ms": default_delay,
        "default_adaptive_delay": defaults.adaptive_delay,
        "default_inline": inline,
        "direct_p50_us": base * 1e6,
        "batcher_delay0_p50_us": zero * 1e6,
        "batcher_default_p50_us": default * 1e6,
        "added_delay0_ms": (zero - base) * 1e3,
        "added_default_ms": (default - base) * 1e3,
    }


# ---------------------------------------------------------------- profile


def profile(run: Running, case: Case, seconds: float, tmp: Path) -> dict[str, Any] | None:
    """py-spy (sampling, non-blocking) on the server process while wrk drives it at c=64."""
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if pyspy is None:
        return None
    raw = tmp / "profile.txt"
    body, expect, _ = case_data(case)
    body_file = tmp / f"{case.key}.json"
    body_file.write_bytes(body)
    spy = subprocess.Popen(
        [
            pyspy,
            "record",
            "--pid",
            str(run.proc.pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--nonblocking",
            "--threads",
            "--format",
            "raw",
            "-o",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    load = wrk(f"{run.base}/models/{case.model}/predict", body_file, expect, 64, seconds)
    _, err = spy.communicate(timeout=seconds + 30)
    if not raw.exists():
        print(f"py-spy failed: {err[-300:]}", file=sys.stderr)
        return None
    return summarize_profile(raw.read_text(), load)


def _frame_name(frame: str) -> tuple[str, str, str]:
    """'func (path/to/file.py:123)' -> ('func (file.py)', 'func (file.py:123)', 'file.py')."""
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})", f"{name} ({path}:{line})", path


_LAYERS = (  # (path prefix, layer); the first match of a sample's leaf frame wins
    ("service/", "foldserve code (service/, incl. the C calls its lines make)"),
    ("fastapi/", "FastAPI (routing, dependencies, middleware)"),
    ("starlette/", "Starlette (routing, middleware, Request/Response)"),
    ("uvicorn/", "uvicorn (HTTP protocol, send/receive)"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("asyncio/", "asyncio (tasks, futures, timeouts)"),
    ("numpy/", "numpy (Python part)"),
    ("concurrent/", "executor hand-off (concurrent.futures)"),
)


def summarize_profile(text: str, load: dict[str, Any], top: int = 25) -> dict[str, Any]:
    """Shares of the event-loop thread's samples: by layer and function (self) and inclusive."""
    threads: collections.Counter[str] = collections.Counter()
    layer: collections.Counter[str] = collections.Counter()
    self_fn: collections.Counter[str] = collections.Counter()
    incl_fn: collections.Counter[str] = collections.Counter()
    self_line: collections.Counter[str] = collections.Counter()
    loop_total = total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        thread_name = thread.partition(": ")[2] or thread  # "thread (pid): MainThread"
        threads[thread_name] += n
        total += n
        if thread_name != "MainThread" or not frames:
            continue
        loop_total += n
        names = [_frame_name(f) for f in frames]
        fn, full, path = names[-1]
        self_fn[fn] += n
        layer[next((label for prefix, label in _LAYERS if path.startswith(prefix)), "other")] += n
        if path.startswith("service/"):
            self_line[full] += n
        for f in {f for f, _, _ in names}:
            incl_fn[f] += n

    def pct(counter: collections.Counter[str], denom: int) -> list[list[Any]]:
        return [[k, round(100 * v / max(denom, 1), 1)] for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "note": "percent of the event-loop (MainThread) samples unless stated; py-spy record "
        "--nonblocking --threads at 200 Hz; C calls (orjson, numpy, onnxruntime) count at "
        "the Python line that makes them",
        "load_requests_per_s": load["requests"] / (load["duration_us"] / 1e6),
        "threads_pct_of_all": pct(threads, total),
        "loop_by_layer": pct(layer, loop_total),
        "loop_self_by_service_line": pct(self_line, loop_total),
        "loop_self_by_function": pct(self_fn, loop_total),
        "loop_inclusive_by_function": pct(incl_fn, loop_total),
    }


# ---------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(ms: list[Measurement], ort: dict[str, dict[str, float]]) -> str:
    by = {(m.server, m.case, m.concurrency): m for m in ms}
    lines = [
        "| server | case | c | req/s | samples/s | p50 ms | p99 ms | errors | vs bare req/s "
        "| vs in-process ORT samples/s | wrk CPU | server CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in ms:
        bare = by.get(("bare", f"mlpx{m.samples_per_request}", m.concurrency))
        ref = ort.get(f"{m.model}/batch{m.samples_per_request}", {}).get("samples_per_s")
        lines.append(
            f"| {m.server} | {m.case} | {m.concurrency} | {m.requests_per_s:,.0f} | "
            f"{m.samples_per_s:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.errors} | "
            f"{fmt(ratio(m.requests_per_s, bare.requests_per_s if bare else None))} | "
            f"{fmt(ratio(m.samples_per_s, ref), '.3f')} | {m.wrk_cpu_cores:.2f} | "
            f"{m.server_cpu_cores:.2f} |"
        )
    return "\n".join(lines)


PAIRED = ("foldserve", "bare", "foldserve-w2")


def paired_rounds(rounds: int, seconds: float, warmup: float, tmp: Path) -> dict[str, Any]:
    """The decisive comparison (digits-mlp, one sample, c=64) again, round after round.

    NOTE: this machine's speed drifts by tens of percent within minutes, and the main matrix
    measures each server minutes apart. Here the servers are up side by side (an idle server
    costs nothing) and measured in turn, in a rotating order, so each round compares servers
    seconds apart; the median of the per-round ratios is what the targets use.
    """
    by_name = {s.name: s for s in servers()}
    case = Case("digits-mlp", 1)
    runs: dict[str, Running] = {}
    per_server: dict[str, list[Measurement]] = {name: [] for name in PAIRED}
    try:
        for name in PAIRED:
            runs[name] = Running(by_name[name], tmp)
        for run in runs.values():
            run.wait_ready()
        for r in range(rounds):
            order = PAIRED[r % len(PAIRED) :] + PAIRED[: r % len(PAIRED)]
            for name in order:
                per_server[name].append(measure(runs[name], case, 64, seconds, warmup, tmp, None))
    finally:
        for run in runs.values():
            run.stop()

    def per_round(num: str, den: str, field: str) -> list[float]:
        return [
            getattr(a, field) / getattr(b, field)
            for a, b in zip(per_server[num], per_server[den], strict=True)
        ]

    ratios = {
        "foldserve_vs_bare_rps": per_round("foldserve", "bare", "requests_per_s"),
        "foldserve_vs_bare_p99": per_round("foldserve", "bare", "p99_ms"),
        "w2_vs_foldserve_rps": per_round("foldserve-w2", "foldserve", "requests_per_s"),
    }
    return {
        "rounds": rounds,
        "seconds": seconds,
        "errors": sum(m.errors for ms in per_server.values() for m in ms),
        "measurements": {name: [asdict(m) for m in ms] for name, ms in per_server.items()},
        "ratios": ratios,
        "median": {k: statistics.median(v) for k, v in ratios.items()},
    }


def targets(
    ms: list[Measurement],
    ort: dict[str, dict[str, float]],
    overhead: dict[str, float] | None,
    rss: dict[str, float] | None,
    paired: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    by = {(m.server, m.case, m.concurrency): m for m in ms}

    def get(server: str, case: str, c: int) -> Measurement | None:
        return by.get((server, case, c))

    fs, bare = get("foldserve", "mlpx1", 64), get("bare", "mlpx1", 64)
    lit, torch_ = get("litserve", "mlpx1", 64), get("torch-eager", "mlpx1", 64)
    w2 = get("foldserve-w2", "mlpx1", 64)
    out: list[dict[str, Any]] = []

    def add(
        name: str, value: float | None, goal: float, higher_is_better: bool = True, detail: str = ""
    ) -> None:
        ok = None if value is None else (value >= goal if higher_is_better else value <= goal)
        sign = ">=" if higher_is_better else "<="
        out.append(
            {
                "target": name,
                "value": value,
                "goal": f"{sign} {goal:g}",
                "result": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
                "detail": detail,
            }
        )

    rps = lambda m: m.requests_per_s if m else None  # noqa: E731
    p99 = lambda m: m.p99_ms if m else None  # noqa: E731

    def decisive(name: str, key: str, single: float | None, goal: float, higher: bool) -> None:
        """With paired rounds, their median ratio decides; the main matrix's is shown beside."""
        if paired is None:
            add(name, single, goal, higher, "main matrix (no paired rounds)")
            return
        each = paired["ratios"][key]
        add(
            name,
            paired["median"][key],
            goal,
            higher,
            f"median of {len(each)} paired rounds (each: {', '.join(f'{v:.2f}' for v in each)}); "
            f"main matrix {fmt(single)}",
        )

    decisive(
        "mlp x1 c=64 req/s vs bare FastAPI",
        "foldserve_vs_bare_rps",
        ratio(rps(fs), rps(bare)),
        1.0,
        True,
    )
    add("mlp x1 c=64 req/s vs LitServe", ratio(rps(fs), rps(lit)), 6.0)
    add("mlp x1 c=64 req/s vs naive torch", ratio(rps(fs), rps(torch_)), 3.0)
    decisive(
        "mlp x1 c=64 p99 / bare p99",
        "foldserve_vs_bare_p99",
        ratio(p99(fs), p99(bare)),
        1.0,
        False,
    )
    decisive(
        "--workers 2 req/s vs 1 process (mlp x1 c=64)",
        "w2_vs_foldserve_rps",
        ratio(rps(w2), rps(fs)),
        1.6,
        True,
    )
    for model, key in (("digits-mlp", "mlpx64"), ("digits-cnn", "cnnx64")):
        best = max(
            (m for m in ms if m.server == "foldserve" and m.case == key),
            key=lambda m: m.samples_per_s,
            default=None,
        )
        ref = ort.get(f"{model}/batch64", {}).get("samples_per_s")
        add(
            f"{key} samples/s vs in-process ORT batch 64",
            ratio(best.samples_per_s if best else None, ref),
            0.5,
            detail=f"best at c={best.concurrency}" if best else "",
        )
    if overhead:
        add(
            "batcher adds at c=1, p50 ms (server defaults)",
            overhead["added_default_ms"],
            0.2,
            False,
            f"in-process Batcher.submit vs backend.run (adaptive delay "
            f"{overhead['default_adaptive_delay']}, inline {overhead['default_inline']}); "
            f"worker thread, max_delay_ms=0: {overhead['added_delay0_ms']:.3f} ms",
        )
    d0, d2 = get("foldserve-delay0", "mlpx1", 1), get("foldserve", "mlpx1", 1)
    if d0 and d2:
        add(
            "HTTP c=1 p50: default delay minus delay 0, ms",
            d2.p50_ms - d0.p50_ms,
            0.2,
            False,
            f"{d2.p50_ms:.2f} ms vs {d0.p50_ms:.2f} ms (info: not the batcher alone)",
        )
    if rss:
        add(
            "RSS of foldserve with both models, MiB (peak)",
            rss.get("VmHWM"),
            300,
            False,
            f"after ready {rss.get('ready_VmRSS', 0):.0f} MiB, "
            f"after load {rss.get('VmRSS', 0):.0f} MiB",
        )
    return out


def plot(ms: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({m.case for m in ms}, key=lambda k: (k.startswith("cnn"), int(k.split("x")[1])))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    # One colour per server across all panels: a panel missing a server must not shift the rest.
    colours = {server: f"C{i}" for i, server in enumerate(dict.fromkeys(m.server for m in ms))}
    for ax, case in zip(axes[0], cases, strict=True):
        for server, colour in colours.items():
            pts = sorted(
                (m for m in ms if m.case == case and m.server == server),
                key=lambda m: m.concurrency,
            )
            if not pts:
                continue
            ax.plot(
                [m.p99_ms for m in pts],
                [m.requests_per_s for m in pts],
                marker="o",
                label=server,
                color=colour,
            )
            for m in pts:
                ax.annotate(f"c{m.concurrency}", (m.p99_ms, m.requests_per_s), fontsize=6)
        ax.set_xscale("log")
        ax.set_title(case.replace("x", ", samples/request: "), fontsize=9)
        ax.set_xlabel("p99 latency (ms, log)")
        ax.set_ylabel("requests/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


# ---------------------------------------------------------------- main


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
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "foldserve",
        "onnxruntime",
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "orjson",
        "numpy",
        "torch",
        "litserve",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="~2 min: mlp cases, c=1 and 64, 2 s runs"
    )
    parser.add_argument(
        "--duration", type=float, help="seconds of load per measurement (5; quick 2)"
    )
    parser.add_argument("--warmup", type=float, help="seconds of warm-up load before each (1)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help="connections (1 8 64; quick 1 64)"
    )
    parser.add_argument("--servers", nargs="+", help="subset of servers to run")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run; later measurements are skipped past it (570; quick 150)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument(
        "--paired-rounds",
        type=int,
        help="rounds of foldserve, bare and --workers 2 side by side (5; quick 2; 0: none)",
    )
    args = parser.parse_args()
    quick = args.quick
    seconds = args.duration or (2.0 if quick else 5.0)
    warmup = args.warmup if args.warmup is not None else 1.0
    conc = tuple(args.concurrency or ((1, 64) if quick else (1, 8, 64)))
    budget = args.budget or (150.0 if quick else 570.0)
    rounds = args.paired_rounds if args.paired_rounds is not None else (2 if quick else 5)
    round_s = 2.0 if quick else 3.0
    cases = [Case("digits-mlp", 1), Case("digits-mlp", 64), Case("digits-mlp", 64, "v2bin")]
    if not quick:
        cases += [Case("digits-cnn", 1), Case("digits-cnn", 64)]
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: run bench/run (it installs it) or 'apt-get install wrk'",
            file=sys.stderr,
        )
        return 2
    t0 = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="foldserve-bench-"))
    print(
        f"# foldserve load benchmark {stamp} ({'quick' if quick else 'full'}; {seconds:g} s per "
        f"measurement, c={list(conc)}, budget {budget:.0f} s; logs in {tmp})",
        flush=True,
    )

    print("in-process onnxruntime ...", flush=True)
    ort = inprocess_onnxruntime(list(dict.fromkeys(c.model for c in cases)), 0.5 if quick else 1.5)
    overhead = batcher_overhead("digits-mlp", 300 if quick else 1000)

    measurements: list[Measurement] = []
    skipped: list[str] = []
    rss: dict[str, float] | None = None
    prof: dict[str, Any] | None = None
    ready_s: dict[str, float] = {}
    chosen = [s for s in servers() if not args.servers or s.name in args.servers]
    for server in chosen:
        todo = [
            (case, c)
            for case in cases
            for c in conc
            if (server.cases is None or case.key in server.cases)
            and (server.concurrency is None or c in server.concurrency)
            and (case.protocol == "predict" or server.speaks_v2)
        ]
        if not todo:
            continue
        if time.monotonic() - t0 > budget:
            skipped += [f"{server.name} {case.key} c={c}" for case, c in todo]
            continue
        run = Running(server, tmp)
        try:
            ready_s[server.name] = run.wait_ready()
            golden = {case.model: check_golden(run, case.model) for case, _ in todo}
            if server.name == "foldserve":
                rss = {f"ready_{k}": v for k, v in rss_mib(run.proc.pid).items()}
            for case, c in todo:
                if time.monotonic() - t0 + seconds + warmup > budget:
                    skipped.append(f"{server.name} {case.key} c={c}")
                    continue
                golden[case.model] = check_golden(run, case.model)  # before each load run
                m = measure(run, case, c, seconds, warmup, tmp, golden[case.model])
                measurements.append(m)
                print(
                    f"  {m.server:17} {m.case:7} c={c:<3} {m.requests_per_s:8,.0f} req/s "
                    f"{m.samples_per_s:10,.0f} samples/s  p50 {m.p50_ms:7.2f} ms  p99 "
                    f"{m.p99_ms:7.2f} ms  errors {m.errors}  wrk CPU {m.wrk_cpu_cores:.2f}",
                    flush=True,
                )
            if server.name == "foldserve":
                rss = {**(rss or {}), **rss_mib(run.proc.pid)}
                if not args.no_profile and time.monotonic() - t0 + 12 < budget:
                    prof = profile(run, Case("digits-mlp", 1), 5 if quick else 8, tmp)
        except Exception as exc:  # one server failing must not lose the others' results
            print(f"  {server.name}: FAILED: {exc}", flush=True)
            skipped += [f"{server.name} {case.key} c={c} ({exc})" for case, c in todo]
        finally:
            run.stop()

    paired = None
    wanted = not args.servers or set(PAIRED) <= set(args.servers)
    if rounds and wanted:
        planned = rounds * len(PAIRED) * (round_s + 0.5 + 1.5) + 15
        if time.monotonic() - t0 + planned > budget + 180:  # its own allowance past the matrix
            skipped.append(f"paired rounds (~{planned:.0f} s: past the budget)")
        else:
            print(f"paired rounds: {rounds} x {list(PAIRED)}, mlpx1 c=64 ...", flush=True)
            try:
                paired = paired_rounds(rounds, round_s, 0.5, tmp)
            except Exception as exc:
                print(f"  paired rounds: FAILED: {exc}", flush=True)
                skipped.append(f"paired rounds ({exc})")
    result = targets(measurements, ort, overhead, rss, paired)
    report = table(measurements, ort)
    print("\n## Results\n")
    print(report)
    print("\n## In-process onnxruntime (1 thread, foldserve's session options)\n")
    for key, v in ort.items():
        print(
            f"- {key}: {v['median_call_us']:.1f} us per call (median), "
            f"{v['samples_per_s']:,.0f} samples/s"
        )
    print(
        f"\nbatcher at c=1 (in-process, digits-mlp): direct {overhead['direct_p50_us']:.1f} us, "
        f"Batcher max_delay_ms=0 in a thread {overhead['batcher_delay0_p50_us']:.1f} us, "
        f"server default ({overhead['default_max_delay_ms']:g} ms, adaptive, "
        f"inline={overhead['default_inline']}) "
        f"{overhead['batcher_default_p50_us']:.1f} us"
    )
    if rss:
        print(f"foldserve RSS (MiB): {json.dumps({k: round(v, 1) for k, v in rss.items()})}")
    print("\n## Targets\n")
    print("| target | value | goal | result | detail |\n|---|--:|---|---|---|")
    for t in result:
        print(
            f"| {t['target']} | {fmt(t['value'], '.3f')} | {t['goal']} | {t['result']} "
            f"| {t['detail']} |"
        )
    if prof:
        print("\n## Profile of foldserve under load (event loop thread, % of its samples)\n")
        print("threads:", prof["threads_pct_of_all"])
        for title in (
            "loop_by_layer",
            "loop_self_by_service_line",
            "loop_self_by_function",
            "loop_inclusive_by_function",
        ):
            print(f"\n{title}:")
            for name, p in prof[title][:15]:
                print(f"  {p:5.1f}%  {name}")
    if paired:
        print("\n## Paired rounds (mlpx1 c=64; servers side by side, measured in turn)\n")
        print(
            "| server | " + " | ".join(f"round {i + 1} req/s, p99 ms" for i in range(rounds)) + " |"
        )
        print("|---|" + "--:|" * rounds)
        for name, ms_ in paired["measurements"].items():
            cells = " | ".join(f"{m['requests_per_s']:,.0f}, {m['p99_ms']:.2f}" for m in ms_)
            print(f"| {name} | {cells} |")
        print(f"\nerrors in the paired rounds: {paired['errors']}")
    if skipped:
        print(f"\nskipped (budget or failure): {skipped}")

    out = {
        "timestamp": stamp,
        "mode": "quick" if quick else "full",
        "command": " ".join(sys.argv),
        "duration_s": seconds,
        "warmup_s": warmup,
        "concurrency": list(conc),
        "machine": machine(),
        "versions": versions(),
        "ready_seconds": ready_s,
        "inprocess_onnxruntime": ort,
        "batcher_overhead": overhead,
        "foldserve_rss_mib": rss,
        "measurements": [asdict(m) for m in measurements],
        "paired_rounds": paired,
        "targets": result,
        "profile": prof,
        "skipped": skipped,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "servers": {s.name: s.label for s in chosen},
    }
    (RESULTS / f"{stamp}.json").write_text(json.dumps(out, indent=1))
    if measurements:
        plot(measurements, RESULTS / f"{stamp}.png")
    if not any("FAILED" in x or "(" in x for x in skipped):
        shutil.rmtree(tmp, ignore_errors=True)  # keep the servers' logs when something failed
    print(f"\nwrote bench/results/{stamp}.json and .png in {out['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
