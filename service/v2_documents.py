"""The Open Inference Protocol's documents (server and model metadata, Triton's model config) as
plain dicts, made once for both of its encodings: JSON over REST (service.routes.v2) and protobuf
over gRPC (service.rpc, which reads the same dicts into its messages)."""

from __future__ import annotations

from typing import Any

from service import __version__
from service.registry import Registry
from service.settings import Settings
from service.store import TensorSpec
from service.versions import ReadyVersion

EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
# A manifest's dtype as V2 names it (metadata, config).
V2_NAMES = {
    "float32": "FP32",
    "float16": "FP16",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
}
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}


def server_metadata(settings: Settings) -> dict[str, Any]:
    extensions = EXTENSIONS
    if settings.management_api:
        extensions = [*EXTENSIONS, "model_repository"]
    return {"name": "foldserve", "version": __version__, "extensions": extensions}


def model_metadata(registry: Registry, entry: ReadyVersion) -> dict[str, Any]:
    manifest = entry.manifest
    return {
        "name": entry.name,
        "versions": [str(e.version) for e in registry.entries() if e.name == entry.name],
        "platform": PLATFORMS[entry.backend.format],
        "inputs": _tensors(manifest.inputs),
        "outputs": _tensors(manifest.outputs),
    }


def model_config(entry: ReadyVersion) -> dict[str, Any]:
    """Triton's model configuration, enough for perf_analyzer and tritonclient."""
    manifest = entry.manifest
    return {
        "name": entry.name,
        "platform": PLATFORMS[entry.backend.format],
        # NOTE: the batcher splits a large request into batches of the manifest's row cap, so
        # the largest batch one request may carry is the queue's bound, not that cap:
        # max_queue_rows, or fewer for large inputs (max_queue_bytes).
        "max_batch_size": entry.batching.max_queue_rows,
        "input": _dims(manifest.inputs),
        "output": _dims(manifest.outputs),
        "dynamic_batching": {},
        "version_policy": {"specific": {"versions": [entry.version]}},
    }


def _tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": V2_NAMES[s.dtype], "shape": [-1, *s.shape]} for s in specs]


def _dims(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [
        {"name": s.name, "data_type": f"TYPE_{V2_NAMES[s.dtype]}", "dims": list(s.shape)}
        for s in specs
    ]
