"""ONNX Runtime backend: one session per model version, CUDA when present and allowed."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from service.backends import Array, BackendOptions
from service.errors import BackendError, ConfigError, VerificationError
from service.packing import Signature
from service.settings import BackendName

log = logging.getLogger(__name__)

# Ops that normalize with statistics of the tensor they are given: with batch-dependent input
# they mix samples. InstanceNorm/LayerNorm are per sample and safe; BatchNormalization is not
# (in training mode it uses the batch; in eval mode it should have been folded by our exporter).
BATCH_STATISTICS_OPS = frozenset({"BatchNormalization"})
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def choose_providers(device: str, available: list[str]) -> list[str]:
    if device == "cpu":
        return [_CPU]
    if _CUDA in available:
        return [_CUDA, _CPU]
    if device == "cuda":
        raise ConfigError(
            f"device 'cuda' requested but onnxruntime offers only {available}; install "
            "onnxruntime-gpu on a machine with a GPU, or set FOLDSERVE_DEVICE=cpu"
        )
    _say_cpu_only(tuple(available))
    return [_CPU]


@functools.cache
def _say_cpu_only(available: tuple[str, ...]) -> None:
    """Once per process, not once per session: every version (and each of its checks) opens
    one, and a CPU machine is no news after the first."""
    log.warning(
        "device auto: no CUDA execution provider in onnxruntime (%s): running on CPU "
        "(FOLDSERVE_DEVICE=cpu says so and keeps quiet)",
        ", ".join(available),
    )


class OnnxBackend:
    format: BackendName = "onnx"

    def __init__(
        self, path: Path, options: BackendOptions, signature: Signature | None = None
    ) -> None:
        self._path = path
        session_options = ort.SessionOptions()
        # NOTE: one intra-op thread per session; small models gain nothing from more and
        # the tail latency suffers when threads contend across server workers.
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = 1
        # NOTE: the pool's threads spin while a run lasts, and stop when it returns: spinning on
        # between runs took a core from the event loop that reads the next request and writes
        # the last answer (a UNet on 2 threads, 2 cores: 7% less CPU per image, as many images).
        session_options.add_session_config_entry("session.force_spinning_stop", "1")
        session_options.enable_cpu_mem_arena = options.memory_arena
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = choose_providers(options.device, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=session_options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            # NOTE: its text names the server's path and its own source files: log only.
            raise BackendError(
                f"{path.name}: onnxruntime cannot load the model (details in the server log)",
                detail=f"{path}: {exc}",
            ) from exc
        self.device = "cuda" if self._session.get_providers()[0] == _CUDA else "cpu"
        if options.device == "cuda" and self.device != "cuda":
            # NOTE: onnxruntime-gpu drops to the CPU without a word when CUDA cannot start (no
            # driver, a container run without --gpus): asked for the GPU, that is an error.
            raise ConfigError(
                f"{path.name}: device 'cuda' requested but onnxruntime fell back to "
                f"{self._session.get_providers()}: check the GPU driver and that the container "
                "sees the GPU (--gpus all), or set FOLDSERVE_DEVICE=cpu"
            )
        graph_inputs = [i.name for i in self._session.get_inputs()]
        graph_outputs = [o.name for o in self._session.get_outputs()]
        self._signature = signature
        if signature is None or (signature.inputs.single and signature.outputs.single):
            # NOTE: by position, as files were always fed: one input, the first output.
            self._input_names = graph_inputs[:1]
            self._output_names = graph_outputs[:1]
        else:
            _check_names(path, "inputs", signature.inputs.names, graph_inputs, every=True)
            _check_names(path, "outputs", signature.outputs.names, graph_outputs, every=False)
            self._input_names = list(signature.inputs.names)
            self._output_names = list(signature.outputs.names)
        self._input_name = self._input_names[0]

    def run(self, batch: Array) -> Array:
        signature = self._signature
        try:
            if signature is None or len(self._input_names) == 1:
                feeds = {self._input_name: batch}
            else:
                feeds = dict(zip(self._input_names, signature.inputs.unpack(batch), strict=True))
            outputs = self._session.run(self._output_names, feeds)
        except Exception as exc:
            raise BackendError(
                f"onnxruntime failed on a batch of {len(batch)} rows", detail=str(exc)
            ) from exc
        if signature is None:
            return np.asarray(outputs[0], dtype=np.float32)
        return signature.outputs.from_runtime(outputs)

    def batch_statistics_ops(self) -> list[str]:
        # Check the file as written, not ORT's optimized graph: the file is what we vouch for.
        model = onnx.load(str(self._path), load_external_data=False)
        found = _find_ops(model.graph.node, "graph")
        for function in model.functions:
            found += _find_ops(function.node, f"function {function.name}")
        return found


def _check_names(
    path: Path, side: str, manifest: tuple[str, ...], graph: list[str], *, every: bool
) -> None:
    """The manifest's tensors must be the graph's (all of its inputs: each one must be fed)."""
    missing = [name for name in manifest if name not in graph]
    unfed = [name for name in graph if name not in manifest] if every else []
    if missing or unfed:
        raise VerificationError(
            f"{path.name}: the manifest's {side} {list(manifest)} are not the graph's {graph}"
        )


def _find_ops(nodes: Iterable[onnx.NodeProto], where: str) -> list[str]:
    """Batch-statistics ops in ``nodes`` and in every subgraph (If/Loop/Scan bodies) below them."""
    found: list[str] = []
    for node in nodes:
        if node.op_type in BATCH_STATISTICS_OPS:
            found.append(f"{node.op_type} ({node.name or 'unnamed'} in {where})")
        for attribute in node.attribute:
            subgraphs = [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]
            for subgraph in subgraphs:
                found += _find_ops(subgraph.node, f"{where}/{node.op_type} {node.name}")
    return found
