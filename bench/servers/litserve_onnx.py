"""LitServe serving the same ONNX models with onnxruntime and its own dynamic batching.

One LitAPI per model (``/models/<name>/predict``; ``/predict`` is digits-mlp), each with
max_batch_size 64 and a 2 ms batch_timeout, the values of foldserve's manifests. A request may
carry many samples: ``batch`` concatenates requests' rows and ``unbatch`` splits them back.
Runs only in the benchmark's environment: litserve is not a foldserve dependency.
"""

import argparse
from typing import Any

import litserve as ls
import numpy as np
import onnxruntime as ort

from servers.common import MODELS, manifest, onnx_path


class OnnxAPI(ls.LitAPI):
    def __init__(self, name: str, api_path: str) -> None:
        super().__init__(max_batch_size=64, batch_timeout=0.002, api_path=api_path)
        self.name = name

    def setup(self, device: str) -> None:
        m = manifest(self.name)
        self.shape = tuple(m["inputs"][0]["shape"])
        self.labels = m["labels"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # as foldserve: one thread per session
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(onnx_path(self.name)), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def decode_request(self, request: dict[str, Any]) -> np.ndarray:
        rows = np.asarray(request["inputs"], dtype=np.float32)
        return rows.reshape(len(rows), *self.shape)

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, x: Any) -> Any:
        if isinstance(x, tuple):  # batched: (rows, rows per request)
            rows, sizes = x
            return self.session.run(None, {self.input_name: rows})[0], sizes
        return self.session.run(None, {self.input_name: x})[0]

    def unbatch(self, output: tuple[np.ndarray, list[int]]) -> list[np.ndarray]:
        out, sizes = output
        return np.split(out, np.cumsum(sizes)[:-1])

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        best = output.argmax(axis=1).tolist()
        return {
            "model": self.name,
            "version": 1,
            "outputs": output.tolist(),
            "predictions": [self.labels[i] for i in best],
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    apis = [OnnxAPI("digits-mlp", "/predict")]
    apis += [OnnxAPI(name, f"/models/{name}/predict") for name in MODELS]
    server = ls.LitServer(
        apis, accelerator="cpu", devices=1, workers_per_device=1, healthcheck_path="/readyz"
    )
    server.run(
        host="127.0.0.1",
        port=port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )
