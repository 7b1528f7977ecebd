"""Arrays between the offline steps: float32 samples with the batch first, and a model's outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from torch import nn

Features = npt.NDArray[np.float32]  # (N, *sample_shape)
INPUT_NAME = "input"  # the names exported graphs give their one input and output
OUTPUT_NAME = "logits"


class Samples(Protocol):
    """What statistics and checks read from: a length, and ``[start:stop]`` slices giving
    (n, *sample_shape) numbers (an array, a memory-mapped .npy file, a folder of images)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any, /) -> Any: ...


def predict(model: nn.Module, x: Features, batch_size: int = 512) -> npt.NDArray[np.float32]:
    """Outputs of ``model`` in eval mode, in float32, computed ``batch_size`` samples at a time."""
    import torch

    model.eval()
    with torch.no_grad():
        chunks = [
            model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)))
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(chunks).float().numpy()


def rows_per_step(sample_shape: tuple[int, ...], elements: int = 1 << 20) -> int:
    """Samples per forward pass so that one step's input holds about ``elements`` numbers.

    NOTE: bounds the memory of statistics, checks and prediction over big inputs (a 3x224x224
    sample is 150,528 numbers: 6 per step; at 27 per step a ResNet-50's activations took more
    than a gigabyte) while small tabular samples still go 512 at a time.
    """
    per_sample = max(1, int(np.prod(sample_shape)))
    return max(1, min(512, elements // per_sample))


def float32_noise(model: nn.Module, x: Features) -> float:
    """How far ``model``'s float32 outputs are from its float64 ones on ``x``, relative to each
    sample's largest output: the rounding error float32 itself brings, before any folding."""
    import copy

    import torch

    wide = copy.deepcopy(model).double().eval()
    try:
        with torch.no_grad():
            exact = wide(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()
    except RuntimeError:
        # A float32 tensor kept as a plain attribute (not a buffer, e.g. MONAI GlobalNet's
        # grid) does not follow .double(): the error is unknown, so the checks keep their
        # default tolerance.
        return 0.0
    rounded = predict(model, x).astype(np.float64)
    flat = len(exact), -1
    scale = np.maximum(np.abs(exact).reshape(flat).max(axis=1), np.finfo(np.float64).tiny)
    diff = np.abs(rounded - exact).reshape(flat).max(axis=1)
    return float((diff / scale).max(initial=0.0))
