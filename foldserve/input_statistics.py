"""Find the BatchNorm applied to the model's input and keep its frozen statistics for drift.

Folding erases them (an input BN becomes part of the first layer's weights), yet they are an exact
record of what the training inputs looked like: per feature for (n, F) samples, per channel for
images and volumes. The manifest keeps them (``service.store.InputStatistics``) and the server
compares its live inputs with them (``service.drift``).

A torch module's input BN is the one whose forward receives the very tensor given to the model
(seen by a pre-hook on a copy, so it works whether torch.fx can trace the model or not); an ONNX
graph's is a BatchNormalization whose X is the graph input.
"""

from __future__ import annotations

from copy import deepcopy
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx

from service.store import InputStatistics

if TYPE_CHECKING:
    import torch
    from torch import nn

# NOTE: torch is imported inside the torch function: `foldserve import` runs without torch.
Source = Literal["ema", "population", "as_imported"]


def module_input_statistics(
    model: nn.Module, example: torch.Tensor, source: Source
) -> InputStatistics | None:
    """The statistics of the first BatchNorm called on ``example`` itself (eval mode, on a copy);
    None when no BatchNorm reads the input directly."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    copy = deepcopy(model).eval()
    found: list[tuple[str, _BatchNorm]] = []

    def watch(name: str) -> object:
        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            # Identity, not equality: the BN must read the input itself, not a computed copy.
            if not found and args and args[0] is example and isinstance(module, _BatchNorm):
                found.append((name, module))

        return hook

    handles = [
        module.register_forward_pre_hook(watch(name))  # type: ignore[arg-type]
        for name, module in copy.named_modules()
        if isinstance(module, _BatchNorm)
    ]
    try:
        with torch.no_grad():
            copy(example)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        return None
    name, batch_norm = found[0]
    mean, var = batch_norm.running_mean, batch_norm.running_var
    if mean is None or var is None:
        return None  # batch statistics at serving time: the export refuses this model anyway
    return InputStatistics(
        layer=name,
        axis="feature" if example.dim() == 2 else "channel",
        source=source,
        mean=tuple(mean.detach().double().tolist()),
        var=tuple(var.detach().double().tolist()),
        eps=float(batch_norm.eps),
    )


def onnx_input_statistics(model: onnx.ModelProto, source: Source) -> InputStatistics | None:
    """The statistics of the first BatchNormalization whose X is the graph's data input."""
    from foldserve.onnx_fold.graph import _Graph
    from foldserve.onnx_fold.statistics import _statistics

    graph = _Graph(model)
    inputs = {value.name: value for value in model.graph.input if value.name in graph.data_inputs}
    for node in graph.batch_norms():
        value = inputs.get(node.input[0])
        if value is None:
            continue
        name = node.name or node.output[0]
        (mean, var, eps, _scale, _bias), _dtype = _statistics(graph, node, name)
        rank = len(value.type.tensor_type.shape.dim)
        return InputStatistics(
            layer=name,
            axis="feature" if rank == 2 else "channel",
            source=source,
            mean=_floats(mean),
            var=_floats(var),
            eps=float(eps[0]),
        )
    return None


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values.astype(np.float64))
