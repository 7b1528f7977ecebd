"""The ModelInferResponse foldserve writes by hand is the one protobuf writes, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from service.rpc import inference_pb2 as pb
from service.rpc.messages import infer_response


def _by_protobuf(
    name: str, version: str, request_id: str, outputs: list[tuple[str, np.ndarray]]
) -> bytes:
    answer = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for output, values in outputs:
        answer.outputs.add(name=output, datatype="FP32", shape=values.shape)
        answer.raw_output_contents.append(values.tobytes())
    data: bytes = answer.SerializeToString()
    return data


@pytest.mark.parametrize(
    ("name", "version", "request_id", "shapes"),
    [
        ("digits-mlp", "1", "", [(1, 10)]),
        ("digits-mlp", "12", "call-7", [(64, 10)]),
        ("m" * 300, "3", "é" * 70, [(0, 10)]),  # lengths past one varint byte; no rows
        ("unet", "2", "x", [(2, 2, 256, 256)]),  # a tensor of 2 MiB
        ("multi", "1", "", [(3, 4), (3, 2, 5), (3,)]),
    ],
)
def test_the_bytes_are_protobufs(
    name: str, version: str, request_id: str, shapes: list[tuple[int, ...]]
) -> None:
    rng = np.random.default_rng(0)
    outputs = [(f"out{i}", rng.standard_normal(s).astype("<f4")) for i, s in enumerate(shapes)]
    ours = infer_response(name, version, request_id, [(n, "FP32", v) for n, v in outputs])
    assert ours == _by_protobuf(name, version, request_id, outputs)
    read = pb.ModelInferResponse.FromString(ours)
    for (output, values), tensor, raw in zip(
        outputs, read.outputs, read.raw_output_contents, strict=True
    ):
        assert tensor.name == output and list(tensor.shape) == list(values.shape)
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(values.shape), values)
