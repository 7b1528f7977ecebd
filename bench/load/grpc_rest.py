"""gRPC against REST on one foldserve process: the same model, rows and connections, V2 binary
tensors over HTTP/1.1 (wrk) and ``ModelInfer`` over gRPC (h2load, nghttp2's HTTP/2 load tool, a C
client as wrk is), measured in turn, round after round.

h2load posts one framed ``ModelInferRequest`` (the 5-byte gRPC prefix, then the message) with
gRPC's headers, one stream in flight per connection as wrk keeps one request per connection.
It counts HTTP/2 answers; a gRPC refusal is an HTTP 200 too, so the server's own count of
successes (Triton's statistics) before and after says how many were answered: any shortfall is
reported as errors. Before the load, one call through grpcio checks the outputs bit for bit
against the manifest's golden outputs.

Target (issue 19): 64-row gRPC at least the samples per second of 64-row REST binary tensors.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from load.cases import Case, manifest
from load.process import Running, running
from load.servers import Server
from load.wrk import measure

ROWS = (1, 64)
CONNECTIONS = (1, 8)
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def available() -> str | None:
    """Why the part cannot run here, or None."""
    if shutil.which("h2load") is None:
        return "h2load is not installed (apt-get install nghttp2-client)"
    return None


def planned_seconds(rounds: int, seconds: float, warmup: float) -> float:
    per = len(ROWS) * len(CONNECTIONS) * 2 * (seconds + warmup + 1.5)
    return rounds * per + 15


def grpc_body(rows: int) -> tuple[bytes, np.ndarray]:
    """A framed ModelInferRequest of the golden inputs repeated to ``rows``; its expected
    outputs."""
    from service.rpc import inference_pb2 as pb

    m = manifest("digits-mlp")
    golden_in = np.asarray(m["golden"]["inputs"], dtype="<f4")
    golden_out = np.asarray(m["golden"]["outputs"], dtype="<f4")
    index = np.arange(rows) % len(golden_in)
    x = golden_in[index]
    request = pb.ModelInferRequest(model_name="digits-mlp")
    request.inputs.add(name=m["inputs"][0]["name"], datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    message = request.SerializeToString()
    return struct.pack(">BI", 0, len(message)) + message, golden_out[index]


def check_golden(port: int, rows: int) -> None:
    """One call through grpcio: the outputs bit for bit as the manifest's golden ones."""
    import grpc

    from service.rpc import inference_pb2 as pb

    framed, expected = grpc_body(rows)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD, response_deserializer=pb.ModelInferResponse.FromString)
        answer = call(framed[5:], timeout=30)
    got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(expected.shape)
    if not np.array_equal(got, expected):
        diff = float(np.abs(got - expected).max())
        raise RuntimeError(f"gRPC outputs differ from the golden ones by {diff:g}")


def successes(run: Running) -> int:
    url = f"{run.base}/v2/models/digits-mlp/stats"
    with urllib.request.urlopen(url, timeout=10) as answer:
        stats = json.load(answer)
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats["model_stats"])


def h2load(port: int, body_file: Path, connections: int, seconds: float) -> dict[str, Any]:
    argv = [
        "h2load",
        f"-c{connections}",
        "-m1",  # one stream in flight per connection, as wrk keeps one request per connection
        f"-D{max(1, round(seconds))}",
        "-H", "content-type: application/grpc",
        "-H", "te: trailers",
        "-d", str(body_file),
        f"http://127.0.0.1:{port}{METHOD}",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", text)
    finished = re.search(r"finished in ([\d.]+)(m?s)", text)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", text)
    if done is None or finished is None:
        raise RuntimeError(f"h2load printed no summary: {(text + out.stderr).strip()[-300:]}")
    wall = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {
        "requests": int(done.group(2)),
        "succeeded": int(done.group(3)),
        "seconds": wall,
        "mean_ms": float(mean.group(1)) * scale[mean.group(2)] if mean else None,
    }


def measure_grpc(
    run: Running, rows: int, c: int, seconds: float, warmup: float, tmp: Path
) -> dict[str, Any]:
    assert run.grpc_port is not None
    framed, _ = grpc_body(rows)
    body_file = tmp / f"grpc-{rows}.body"
    body_file.write_bytes(framed)
    if warmup > 0:
        h2load(run.grpc_port, body_file, c, warmup)
        time.sleep(0.5)
    answered0, cpu0 = successes(run), run.cpu_seconds()
    r = h2load(run.grpc_port, body_file, c, seconds)
    cpu = run.cpu_seconds() - cpu0
    answered = successes(run) - answered0
    per_s = answered / r["seconds"]
    return {
        "protocol": "grpc",
        "rows": rows,
        "connections": c,
        "requests_per_s": per_s,
        "samples_per_s": per_s * rows,
        "mean_ms": r["mean_ms"],
        "errors": max(0, r["requests"] - answered),
        "cpu_us_per_request": 1e6 * cpu / answered if answered else 0.0,
        "server_cpu_cores": cpu / r["seconds"],
    }


def measure_rest(
    run: Running, rows: int, c: int, seconds: float, warmup: float, tmp: Path
) -> dict[str, Any]:
    m = measure(run, Case("digits-mlp", rows, "v2bin"), c, seconds, warmup, tmp, None)
    return {
        "protocol": "rest-v2-binary",
        "rows": rows,
        "connections": c,
        "requests_per_s": m.requests_per_s,
        "samples_per_s": m.samples_per_s,
        "mean_ms": m.mean_ms,
        "errors": m.errors,
        "cpu_us_per_request": m.cpu_us_per_request,
        "server_cpu_cores": m.server_cpu_cores,
    }


def rounds(server: Server, n: int, seconds: float, warmup: float, tmp: Path) -> dict[str, Any]:
    per: dict[str, list[dict[str, Any]]] = {}
    with running([server], tmp) as runs:
        run = runs[server.name]
        assert run.grpc_port is not None, "foldserve runs its gRPC service in the bench"
        for rows in ROWS:
            check_golden(run.grpc_port, rows)
        for r in range(n):
            for rows in ROWS:
                for c in CONNECTIONS:
                    # Alternating which goes first, round by round.
                    sides = [measure_rest, measure_grpc]
                    for side in sides if r % 2 == 0 else sides[::-1]:
                        result = side(run, rows, c, seconds, warmup, tmp)
                        per.setdefault(f"{result['protocol']} x{rows} c={c}", []).append(result)
    return summarize(per)


def summarize(per: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def median(key: str, field: str) -> float:
        return statistics.median(m[field] for m in per[key])

    table: list[dict[str, Any]] = []
    for rows in ROWS:
        for c in CONNECTIONS:
            rest, grpc = f"rest-v2-binary x{rows} c={c}", f"grpc x{rows} c={c}"
            if rest not in per or grpc not in per:
                continue
            ratios = [
                g["samples_per_s"] / r["samples_per_s"]
                for g, r in zip(per[grpc], per[rest], strict=True)
                if r["samples_per_s"]
            ]
            table.append(
                {
                    "rows": rows,
                    "connections": c,
                    "rest_samples_per_s": median(rest, "samples_per_s"),
                    "grpc_samples_per_s": median(grpc, "samples_per_s"),
                    "grpc_vs_rest": statistics.median(ratios) if ratios else 0.0,
                    "rest_cpu_us_per_request": median(rest, "cpu_us_per_request"),
                    "grpc_cpu_us_per_request": median(grpc, "cpu_us_per_request"),
                    "grpc_errors": sum(m["errors"] for m in per[grpc]),
                    "rest_errors": sum(m["errors"] for m in per[rest]),
                }
            )
    sixty_four = [row["grpc_vs_rest"] for row in table if row["rows"] == 64]
    return {
        "rounds": len(next(iter(per.values()), [])),
        "table": table,
        "measurements": per,
        "target": {
            "what": "64-row gRPC samples/s >= 64-row REST binary samples/s (each connection count)",
            "worst_ratio": min(sixty_four) if sixty_four else None,
            "met": bool(sixty_four) and min(sixty_four) >= 1.0,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print("\n## gRPC and REST (V2 binary) on one foldserve process, digits-mlp\n")
    print(
        "| rows | c | REST samples/s | gRPC samples/s | gRPC/REST | REST CPU us/req "
        "| gRPC CPU us/req | errors (REST, gRPC) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in result["table"]:
        print(
            f"| {row['rows']} | {row['connections']} | {row['rest_samples_per_s']:,.0f} "
            f"| {row['grpc_samples_per_s']:,.0f} | {row['grpc_vs_rest']:.2f} "
            f"| {row['rest_cpu_us_per_request']:.0f} | {row['grpc_cpu_us_per_request']:.0f} "
            f"| {row['rest_errors']}, {row['grpc_errors']} |"
        )
    target = result["target"]
    ratio = target["worst_ratio"]
    shown = "n/a" if ratio is None else f"{ratio:.2f}"
    print(f"\ntarget: {target['what']}: worst {shown} -> {'met' if target['met'] else 'NOT met'}")
