"""Inference runtimes behind one small interface: numpy in, numpy out.

Runtimes are imported lazily so the plain install never needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from service.errors import ConfigError
from service.settings import BackendName, Device

if TYPE_CHECKING:
    from service.packing import Signature

Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class BackendOptions:
    device: Device = "auto"
    intra_op_threads: int = 1
    # NOTE: onnxruntime's arena keeps the largest batch's memory for the next run: what a server
    # wants, not a one-off check (the export's verification turns it off: its peak RSS).
    memory_arena: bool = True


class Backend(Protocol):
    format: BackendName
    device: str

    def run(self, batch: Array) -> Array:
        """Run one batch (batch dimension first) and return the outputs, one row per input row
        (several inputs or outputs side by side in each row: ``service.packing``)."""
        ...

    def batch_statistics_ops(self) -> list[str]:
        """Describe every op or module in the program that could normalize with batch statistics."""
        ...


def load_backend(
    fmt: BackendName, path: Path, options: BackendOptions, signature: Signature | None = None
) -> Backend:
    """The runtime for ``path``; ``signature``: the manifest's inputs and outputs, fed and read
    by name (None: the program's one input and its first output)."""
    if fmt == "onnx":
        from service.backends.onnx import OnnxBackend

        return OnnxBackend(path, options, signature)
    if fmt == "torchscript":
        try:
            from service.backends.torchscript import TorchScriptBackend
        except ImportError as exc:
            raise ConfigError(
                "backend 'torchscript' needs torch: pip install 'foldserve[torchscript]'"
            ) from exc
        return TorchScriptBackend(path, options, signature)
    raise ConfigError(f"unknown backend {fmt!r}: use 'onnx' or 'torchscript'")
