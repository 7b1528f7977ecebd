"""TorchScript backend: the only module of the server that imports torch."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from service.backends import Array, BackendOptions
from service.errors import BackendError, ConfigError
from service.packing import Signature
from service.settings import BackendName

log = logging.getLogger(__name__)

_BATCH_NORM_KINDS = (
    "aten::batch_norm",
    "aten::native_batch_norm",
    "aten::_native_batch_norm_legit",
)


class TorchScriptBackend:
    format: BackendName = "torchscript"

    def __init__(
        self, path: Path, options: BackendOptions, signature: Signature | None = None
    ) -> None:
        self._signature = signature
        self.device = _choose_device(options.device)
        torch.set_num_threads(options.intra_op_threads)
        try:
            with warnings.catch_warnings():
                # NOTE: torch 2.13 deprecates torch.jit; loading TorchScript is still what we serve.
                warnings.simplefilter("ignore", DeprecationWarning)
                self._module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(path), map_location=self.device
                )
        except Exception as exc:
            raise BackendError(
                f"{path.name}: torch cannot load the TorchScript program (details in the server "
                "log)",
                detail=f"{path}: {exc}",
            ) from exc
        self._module.eval()

    def run(self, batch: Array) -> Array:
        signature = self._signature
        inputs = [batch] if signature is None else signature.inputs.unpack(batch)
        try:
            with torch.inference_mode():
                result = self._module(*(torch.from_numpy(x).to(self.device) for x in inputs))
        except Exception as exc:
            raise BackendError(
                f"TorchScript failed on a batch of {len(batch)} rows", detail=str(exc)
            ) from exc
        if signature is None:
            return np.asarray(_tensors(result, ())[0], dtype=np.float32)
        return signature.outputs.from_runtime(_tensors(result, signature.outputs.names))

    def batch_statistics_ops(self) -> list[str]:
        found = [
            f"module {name or '<root>'} ({module.original_name})"
            for name, module in self._module.named_modules()
            if "BatchNorm" in getattr(module, "original_name", "")
        ]
        # The inlined graph holds every submodule's code, so one walk sees every op.
        found += _find_kinds(self._module.inlined_graph.nodes())
        return found


def _tensors(result: object, names: tuple[str, ...]) -> list[np.ndarray]:
    """The program's outputs in the manifest's order: one tensor, a tuple or list of them (by
    position), or a dict of them (by name)."""
    if isinstance(result, torch.Tensor):
        found: list[object] = [result]
    elif isinstance(result, dict):
        missing = [name for name in names if name not in result]
        if missing:
            raise BackendError(f"TorchScript returned no outputs named {missing}")
        found = [result[name] for name in names]
    elif isinstance(result, tuple | list):
        found = list(result)
    else:
        raise BackendError(f"TorchScript returned {type(result).__name__}, not tensors")
    if names and len(found) < len(names):
        raise BackendError(f"TorchScript returned {len(found)} outputs for {len(names)} named")
    return [_numpy(tensor) for tensor in found[: max(1, len(names))]]


def _numpy(tensor: object) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise BackendError(f"TorchScript returned {type(tensor).__name__} among its outputs")
    return tensor.detach().cpu().numpy()


def _choose_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ConfigError("device 'cuda' requested but torch sees no GPU; set FOLDSERVE_DEVICE=cpu")
    log.warning("torch sees no CUDA device: TorchScript runs on CPU")
    return "cpu"


def _find_kinds(nodes: Iterable[torch.Node]) -> list[str]:
    """Batch-norm nodes, including inside the blocks of control flow (if/loop)."""
    found: list[str] = []
    for node in nodes:
        if node.kind() in _BATCH_NORM_KINDS:
            found.append(node.kind())
        for block in node.blocks():
            found += _find_kinds(block.nodes())
    return found
