"""The naive baseline: FastAPI + pydantic + torch eager, one forward per request, no batching.

What a first deployment usually looks like: a pydantic body model, ``torch.tensor`` on the
parsed lists, a synchronous route (FastAPI runs it in its thread pool), torch's default threads.

NOTE: an honest *eager* model needs an nn.Module, but the store ships ONNX and TorchScript only
(TorchScript is not eager). So the folded ONNX graph is rebuilt as an nn.Module whose forward
runs each ONNX node with the matching torch op, in eager mode: the same weights and arithmetic
as foldserve's model, executed the way eager PyTorch executes a hand-written forward.
"""

from __future__ import annotations

import argparse
from typing import Any

import onnx
import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI
from onnx import numpy_helper
from pydantic import BaseModel

from servers.common import MODELS, manifest, onnx_path, uvicorn_options


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _run_node(node: onnx.NodeProto, x: list[torch.Tensor]) -> torch.Tensor:
    op, a = node.op_type, _attrs(node)
    if op == "Gemm":
        assert a.get("transA", 0) == 0 and a.get("transB", 0) == 1, "only x @ W.T + b"
        return F.linear(x[0], x[1], x[2] if len(x) > 2 else None)
    if op == "Conv":
        pads = a.get("pads", [0, 0, 0, 0])
        assert pads[:2] == pads[2:], "symmetric padding only"
        return F.conv2d(
            x[0],
            x[1],
            x[2] if len(x) > 2 else None,
            a.get("strides", 1),
            pads[:2],
            a.get("dilations", 1),
            a.get("group", 1),
        )
    if op == "Relu":
        return F.relu(x[0])
    if op == "Add":
        return x[0] + x[1]
    if op == "Mul":
        return x[0] * x[1]
    if op == "MaxPool":
        return F.max_pool2d(x[0], a["kernel_shape"], a.get("strides"), a.get("pads", [0, 0])[:2])
    if op == "Reshape":
        return x[0].reshape([int(d) for d in x[1].tolist()])
    raise NotImplementedError(f"ONNX op {op} has no eager translation here")


class EagerGraph(torch.nn.Module):
    """The ONNX graph's initializers as buffers; ``forward`` runs its nodes in order."""

    def __init__(self, path: str) -> None:
        super().__init__()
        graph = onnx.load(path).graph
        self.nodes = list(graph.node)
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        self.consts = {
            i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {**self.consts, self.input_name: x}
        for node in self.nodes:
            values[node.output[0]] = _run_node(node, [values[i] for i in node.input])
        return values[self.output_name]


class PredictRequest(BaseModel):
    inputs: list[list[float]]  # flat samples


def create_app() -> FastAPI:
    app = FastAPI(docs_url=None, openapi_url=None)
    models = {}
    for name in MODELS:
        m = manifest(name)
        models[name] = (
            EagerGraph(str(onnx_path(name))).eval(),
            m["inputs"][0]["shape"],
            m["labels"],
        )

    def run(name: str, req: PredictRequest) -> dict[str, Any]:
        model, shape, labels = models[name]
        x = torch.tensor(req.inputs, dtype=torch.float32).reshape(-1, *shape)
        with torch.no_grad():
            out = model(x)
        return {
            "model": name,
            "version": 1,
            "outputs": out.tolist(),
            "predictions": [labels[i] for i in out.argmax(dim=1).tolist()],
        }

    @app.post("/predict")
    def predict(req: PredictRequest) -> dict[str, Any]:
        return run("digits-mlp", req)

    @app.post("/models/{name}/predict")
    def predict_model(name: str, req: PredictRequest) -> dict[str, Any]:
        return run(name, req)

    @app.get("/readyz")
    def ready() -> dict[str, Any]:
        return {}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvicorn.run(create_app(), **uvicorn_options(parser.parse_args().port))
