"""What each protocol's connection layer costs per call, alone: foldserve's HTTP/1.1 connection
(service/http/) and its HTTP/2 one for gRPC (service/rpc/wire/), each fed in-process the bytes a
load tool sends for a 64-row V2 binary request, through a transport that keeps nothing, to a
handler that answers a constant of the size of the real answer. Prints microseconds per call,
the two interleaved over rounds (this machine is shared: compare within one run).

    .venv/bin/python bench/transport_cost.py [--calls 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import hpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.http.connection import Connection as HttpConnection  # noqa: E402
from service.http.limits import BodyBudget, HttpLimits  # noqa: E402
from service.http.request import Request  # noqa: E402
from service.http.response import Response, answered  # noqa: E402
from service.http.server import HttpServer  # noqa: E402
from service.rpc import inference_pb2 as pb  # noqa: E402
from service.rpc.wire import frames as f  # noqa: E402
from service.rpc.wire.connection import Connection as GrpcConnection  # noqa: E402
from service.rpc.wire.connection import WireLimits  # noqa: E402
from service.rpc.wire.methods import Kind, Method  # noqa: E402

PATH = b"/inference.GRPCInferenceService/ModelInfer"
ANSWER = b"\0" * 2_600  # a 64-row digits-mlp answer's size


class NullTransport:
    """Counts the writes and forgets them."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def writelines(self, data: Any) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class ConstantApp:
    """The HTTP server's application, answering at once."""

    async def startup(self) -> None:
        pass

    def handle(self, request: Request, over_limit: bool) -> Any:
        return answered(Response(200, ANSWER, None))

    def start_draining(self) -> None:
        pass

    def eager(self, request: Request) -> bool:
        return True

    async def shutdown(self) -> None:
        pass


class ConstantSite:
    """The gRPC connection's server, with one method answering at once."""

    def __init__(self) -> None:
        async def constant(raw: bytes, call: Any) -> bytes:
            return ANSWER

        self.methods = {PATH: Method(Kind.UNARY, constant)}
        self.limits = WireLimits(64 << 20, 65_536)
        self.budget = BodyBudget(256 << 20)

    def opened(self, connection: Any) -> int:
        return 1

    def closed(self, connection: Any) -> None:
        pass


def rows() -> np.ndarray:
    manifest = json.loads((ROOT / "model_store/digits-mlp/1/manifest.json").read_text())
    golden = np.asarray(manifest["golden"]["inputs"], dtype="<f4")
    return np.ascontiguousarray(golden[np.arange(64) % len(golden)])


def http_request(x: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": x.nbytes}
    head = json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()
    body = head + x.tobytes()
    return (
        b"POST /v2/models/digits-mlp/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (len(head), len(body))
    ) + body


def grpc_calls(x: np.ndarray, count: int) -> list[bytes]:
    """``count`` calls as h2load sends them: HEADERS, then the message in DATA frames of 16 KiB
    (the last with END_STREAM), and the window the client gives back."""
    request = pb.ModelInferRequest(model_name="digits-mlp")
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    message = request.SerializeToString()
    framed = struct.pack(">BI", 0, len(message)) + message
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", PATH.decode()),
        (":authority", "127.0.0.1:8001"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("content-length", str(len(framed))),
    ]
    encoder = hpack.Encoder()
    calls = []
    for i in range(count):
        stream = 1 + 2 * i
        data = b"".join(
            f.frame(f.DATA, 0, stream, framed[at : at + 16_384])
            for at in range(0, len(framed) - 16_384, 16_384)
        )
        last = framed[(len(framed) - 1) // 16_384 * 16_384 :]
        calls.append(
            f.frame(f.HEADERS, f.END_HEADERS, stream, encoder.encode(headers))
            + data
            + f.frame(f.DATA, f.END_STREAM, stream, last)
            + f.window_update(0, len(ANSWER) + 64)
        )
    return calls


async def measure(calls: int, rounds: int) -> dict[str, list[float]]:
    x = rows()
    http = HttpConnection(HttpServer(ConstantApp(), HttpLimits()))  # type: ignore[arg-type]
    http_out, grpc_out = NullTransport(), NullTransport()
    http.connection_made(http_out)
    grpc = GrpcConnection(ConstantSite())  # type: ignore[arg-type]
    grpc.connection_made(grpc_out)
    grpc.data_received(f.PREFACE + f.settings_frame({}) + f.window_update(0, 1 << 30))
    request = http_request(x)
    streams = grpc_calls(x, (rounds + 1) * calls)
    for data in streams[:calls]:  # warm up both
        grpc.data_received(data)
        http.data_received(request)
    timings: dict[str, list[float]] = {"http/1.1 (REST)": [], "http/2 (gRPC)": []}
    for round_ in range(1, rounds + 1):
        started = time.process_time()
        for data in streams[round_ * calls : (round_ + 1) * calls]:
            grpc.data_received(data)
        timings["http/2 (gRPC)"].append((time.process_time() - started) / calls * 1e6)
        started = time.process_time()
        for _ in range(calls):
            http.data_received(request)
        timings["http/1.1 (REST)"].append((time.process_time() - started) / calls * 1e6)
        await asyncio.sleep(0)
    answered_calls = (rounds + 1) * calls
    if min(http_out.writes, grpc_out.writes) < answered_calls:  # each call answered: a write
        raise RuntimeError(f"calls unanswered: {http_out.writes}, {grpc_out.writes} writes")
    if not http_out.last.startswith(b"HTTP/1.1 200") or b"grpc-status\x010" not in grpc_out.last:
        raise RuntimeError("a call was refused: the figures would not be the answer's")
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    timings = asyncio.run(measure(args.calls, args.rounds))
    print("| connection layer | CPU us per call, each round |")
    print("|---|---|")
    for name, values in timings.items():
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
