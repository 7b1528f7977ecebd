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


def release_memory() -> None:
    """Hand memory freed by Python and torch back to the system (glibc keeps it otherwise,
    and a big model's export steps leave hundreds of megabytes of it); elsewhere a no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return


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
    # NOTE: in small steps: float64 activations are twice float32's, and 8 images of 3x224x224
    # at once took a ResNet-50 export's RSS from 1.5 to 2.3 GiB (its peak).
    step = rows_per_step(tuple(np.shape(x)[1:]), elements=1 << 18)
    try:
        with torch.no_grad():
            exact = np.concatenate(
                [
                    wide(torch.from_numpy(np.asarray(x[i : i + step], dtype=np.float64))).numpy()
                    for i in range(0, len(x), step)
                ]
            )
    except RuntimeError:
        # A float32 tensor kept as a plain attribute (not a buffer, e.g. MONAI GlobalNet's
        # grid) does not follow .double(): the error is unknown, so the checks keep their
        # default tolerance.
        return 0.0
    del wide
    rounded = predict(model, x, step).astype(np.float64)
    flat = len(exact), -1
    scale = np.maximum(np.abs(exact).reshape(flat).max(axis=1), np.finfo(np.float64).tiny)
    diff = np.abs(rounded - exact).reshape(flat).max(axis=1)
    return float((diff / scale).max(initial=0.0))
