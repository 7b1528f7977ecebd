"""Bring a user's module to what the server runs: float32, eval mode, on the CPU.

A float64, float16 or bfloat16 model is converted on a copy, and the conversion is checked by
running both on the same inputs; anything else (integer or quantized weights) is refused up front,
before statistics, folding or export spend any time on it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from foldserve.tensors import Features, rows_per_step
from service.errors import FoldingError
from service.verify import max_relative_diff

_CONVERTIBLE = {torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# NOTE: the tolerance is the original dtype's own precision as seen at the outputs: float16 keeps
# ~3 decimal digits per op and bfloat16 ~2, so a float32 copy differs from them by that much
# after a few layers; float64 -> float32 only rounds once per weight.


@dataclass(frozen=True)
class Converted:
    model: nn.Module  # float32, eval mode, CPU
    conversion: str | None  # e.g. "float16 -> float32 (max rel diff 3.1e-4)"; None if none needed


def to_float32(model: nn.Module, check_inputs: Features) -> Converted:
    """The model in float32 (a copy when converted), with the conversion checked on inputs."""
    dtypes = _floating_dtypes(model)
    original = next(iter(dtypes)) if len(dtypes) == 1 else None
    if dtypes <= {torch.float32}:
        return Converted(model.eval(), None)
    if original not in _CONVERTIBLE:
        raise FoldingError(
            f"the model mixes or uses unsupported dtypes {sorted(map(str, dtypes))}: foldserve "
            "serves float32; convert it yourself (model.float()) and check its accuracy"
        )
    converted = copy.deepcopy(model).float().eval()
    inputs = check_inputs[: rows_per_step(check_inputs.shape[1:], elements=1 << 20)]
    try:
        with torch.no_grad():
            reference = model.eval()(torch.from_numpy(inputs).to(original)).float().numpy()
    except RuntimeError as exc:
        raise FoldingError(
            f"cannot run the {original} model on the CPU to check its conversion ({exc}); "
            "convert it with model.float() yourself"
        ) from exc
    with torch.no_grad():
        actual = converted(torch.from_numpy(inputs)).numpy()
    relative = max_relative_diff(actual, reference) if np.isfinite(reference).all() else np.inf
    tolerance = _CONVERTIBLE[original]
    if not relative <= tolerance:
        raise FoldingError(
            f"converting the {original} model to float32 changes its outputs by {relative:.3g} "
            f"of their scale (more than {tolerance:g}); check the model in float32 yourself"
        )
    name = str(original).removeprefix("torch.")
    return Converted(converted, f"{name} -> float32 (max rel diff {relative:.2g})")


def _floating_dtypes(model: nn.Module) -> set[torch.dtype]:
    tensors = [*model.parameters(), *model.buffers()]
    refused = {t.dtype for t in tensors if t.is_quantized or t.is_complex()}
    if refused:
        raise FoldingError(
            f"the model holds {sorted(map(str, refused))} tensors: foldserve folds float models"
        )
    # Integer buffers (num_batches_tracked) are counters, not weights.
    return {t.dtype for t in tensors if t.is_floating_point()}
