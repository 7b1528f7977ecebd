"""`foldserve serve --workers 2` shares the gRPC port between its workers as it shares HTTP's:
both listen on it, calls are answered, and SIGTERM drains both to exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from service.rpc import inference_pb2 as pb
from tests.service.conftest import ROOT
from tests.service.server_process import until_ready


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_two_workers_share_the_grpc_port(tmp_path: Path) -> None:
    port, grpc_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FOLDSERVE_")}
    env |= {"FOLDSERVE_GRPC": "true"}  # the default; the test suite turns it off elsewhere
    command = [sys.executable, "-m", "service", "serve", "--port", str(port), "--workers", "2"]
    command += ["--grpc-port", str(grpc_port)]
    command += ["--model-store", str(ROOT / "model_store")]
    log = tmp_path / "server.log"
    manifest = json.loads((ROOT / "model_store/digits-mlp/1/manifest.json").read_text())
    x = np.asarray(manifest["golden"]["inputs"][:1], dtype="<f4")
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        until_ready(f"http://127.0.0.1:{port}", server, timeout=60)
        deadline = time.monotonic() + 30
        while len(set(re.findall(r"gRPC listening on \S+ \(pid (\d+)\)", log.read_text()))) < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        request = pb.ModelInferRequest(model_name="digits-mlp")
        request.inputs.add(name="input", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        for _ in range(8):  # new connections: the kernel spreads them over both workers
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                call = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelInfer",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                answer = call(request, timeout=10)
                got = np.frombuffer(answer.raw_output_contents[0], "<f4")
                np.testing.assert_allclose(got, manifest["golden"]["outputs"][0], atol=1e-4)
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert "Traceback" not in log.read_text()
