"""Find the BatchNorm applied to the model's input and keep its frozen statistics for drift.

Folding erases them (an input BN becomes part of the first layer's weights), yet they are an exact
record of what the training inputs looked like: per feature for (n, F) samples, per channel for
images and volumes. The manifest keeps them (``service.store.InputStatistics``) and the server
compares its live inputs with them (``service.drift``).

A torch module's input BN is the one whose forward receives the very tensor given to the model
(seen by a pre-hook on a copy, so it works whether torch.fx can trace the model or not); an ONNX
graph's is a BatchNormalization whose X is the graph input.

Hidden BatchNorms cheap to observe at the input (torch modules only): one reading a Linear's or
Conv2d's output where that layer reads the input or the input BN's output. Its input is then an
affine map of the raw input: the input BN's eval affine composed with the layer's weight and
bias, kept in a side file (``service.monitor_maps``) beside the BN's statistics
(``service.store.HiddenStatistics``). Not for imported ONNX files (docs/drift.md).
"""

from __future__ import annotations

import hashlib
import logging
import re
from copy import deepcopy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from foldserve.calibration import Calibration
from foldserve.tensors import rows_per_step
from service.monitor_maps import MAX_WEIGHTS, encode
from service.packing import Packing
from service.store import HiddenStatistics, InputStatistics, SideFile

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

# NOTE: torch is imported inside the torch function: `foldserve import` runs without torch.
Source = Literal["ema", "population", "as_imported"]
log = logging.getLogger(__name__)
# The composed map (float32) against the BN's actual input, relative to its largest value.
MAP_RTOL = 1e-4


@dataclass(frozen=True)
class HiddenMonitor:
    """A hidden BatchNorm's statistics and its map's side file, to write into the version."""

    statistics: HiddenStatistics
    content: bytes  # the side file, statistics.file.path

    @property
    def filename(self) -> str:
        return self.statistics.file.path


@dataclass
class _Trace:
    """What one eval forward pass of a copy showed about the layers reading the input."""

    input_bn: tuple[str, _BatchNorm] | None = None
    # (hidden BN, the Linear/Conv2d feeding it, the input BN composed in, the BN's actual input)
    hidden: list[tuple[str, _BatchNorm, str, nn.Module, str | None, torch.Tensor]] = field(
        default_factory=list
    )


def _trace(model: nn.Module, example: torch.Tensor) -> _Trace:
    """Run a copy in eval mode with hooks that follow the input tensor by identity.

    NOTE: identity, not equality: a BN must read the input itself (or the layer's output
    itself), not a computed copy. Seen by hooks, so it works whether torch.fx can trace the
    model or not.
    """
    import torch
    from torch import nn as torch_nn
    from torch.nn.modules.batchnorm import _BatchNorm as BatchNorm

    copy = deepcopy(model).eval()
    trace = _Trace()
    normalized: list[torch.Tensor] = []  # the input BN's output (kept alive: ids stay unique)
    mapped: dict[int, tuple[torch.Tensor, str, nn.Module, str | None]] = {}

    def before_bn(name: str) -> object:
        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            if not args or not isinstance(module, BatchNorm):
                return
            if trace.input_bn is None and args[0] is example:
                trace.input_bn = (name, module)
            seen = mapped.get(id(args[0]))
            if seen is not None and seen[0] is args[0]:
                _, source, layer, through = seen
                actual = args[0].detach().clone()
                trace.hidden.append((name, module, source, layer, through, actual))

        return hook

    def after_bn(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        found = trace.input_bn
        if found is not None and found[1] is module and args and args[0] is example:
            normalized.append(output)  # type: ignore[arg-type]

    def after_layer(name: str) -> object:
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            if not args or not isinstance(output, torch.Tensor):
                return
            if args[0] is example:
                mapped[id(output)] = (output, name, module, None)
            elif normalized and args[0] is normalized[0] and trace.input_bn is not None:
                mapped[id(output)] = (output, name, module, trace.input_bn[0])

        return hook

    handles = []
    for name, module in copy.named_modules():
        if isinstance(module, BatchNorm):
            handles.append(module.register_forward_pre_hook(before_bn(name)))  # type: ignore[arg-type]
            handles.append(module.register_forward_hook(after_bn))
        # Exact types: a subclass may compute something else in its forward.
        elif type(module) in (torch_nn.Linear, torch_nn.Conv2d):
            handles.append(module.register_forward_hook(after_layer(name)))
    try:
        with torch.no_grad():
            copy(example)
    finally:
        for handle in handles:
            handle.remove()
    return trace


def module_input_statistics(
    model: nn.Module, example: torch.Tensor, source: Source
) -> InputStatistics | None:
    """The statistics of the first BatchNorm called on ``example`` itself (eval mode, on a copy);
    None when no BatchNorm reads the input directly."""
    found = _trace(model, example).input_bn
    if found is None:
        return None
    name, batch_norm = found
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


def module_hidden_statistics(
    model: nn.Module, example: torch.Tensor, source: Source
) -> list[HiddenMonitor]:
    """The hidden BatchNorms cheap to observe at the input: those reading the output of a
    Linear (on (n, F) inputs) or Conv2d (groups 1, no dilation, zero padding; on (n, C, H, W)
    inputs) that reads the raw input or the input BatchNorm's output. Each gets one map from raw
    inputs to its input, checked against what the BN actually received on ``example``. Others
    (larger than MAX_WEIGHTS, other layers) are skipped, and logged."""
    trace = _trace(model, example)
    monitors: list[HiddenMonitor] = []
    for name, batch_norm, layer_name, layer, through, actual in trace.hidden:
        try:
            arrays, record = _compose(trace, layer_name, layer, through, example.dim())
            _check_map(record, arrays, example, actual)
        except _Skip as skip:
            log.warning("hidden BatchNorm %s is not monitored for drift: %s", name, skip)
            continue
        mean, var = batch_norm.running_mean, batch_norm.running_var
        if mean is None or var is None:
            continue
        content = encode(arrays)
        monitors.append(
            HiddenMonitor(
                HiddenStatistics(
                    layer=name,
                    axis="feature" if record["map"] == "linear" else "channel",
                    source=source,
                    mean=tuple(mean.detach().double().tolist()),
                    var=tuple(var.detach().double().tolist()),
                    eps=float(batch_norm.eps),
                    file=SideFile(
                        path=f"monitor-{_safe(name)}.npz",
                        sha256=hashlib.sha256(content).hexdigest(),
                        size_bytes=len(content),
                    ),
                    **record,
                ),
                content,
            )
        )
    if len({m.filename for m in monitors}) != len(monitors):
        log.warning("hidden BatchNorms with clashing file names are not monitored")
        return []
    return monitors


class _Skip(Exception):
    """This hidden BatchNorm cannot be observed cheaply at the input; the message says why."""


def _compose(
    trace: _Trace, layer_name: str, layer: nn.Module, through: str | None, rank: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The map's arrays (float64, composed) and the record's map fields."""
    from torch import nn as torch_nn

    weight = layer.weight.detach().double().numpy()  # type: ignore[operator]
    bias_param = layer.bias
    if weight.size > MAX_WEIGHTS:
        raise _Skip(f"its map from the input has {weight.size:,} weights (> {MAX_WEIGHTS:,})")
    bias = np.zeros(len(weight))
    if bias_param is not None:
        bias = bias_param.detach().double().numpy()  # type: ignore[operator]
    scale, shift = _input_affine(trace, through, weight.shape[1])
    record: dict[str, Any] = {"map_from": layer_name, "through": through}
    if isinstance(layer, torch_nn.Linear):
        if rank != 2:
            raise _Skip(f"{layer_name} is a Linear on inputs of rank {rank} (only (n, F))")
        record["map"] = "linear"
        # rows @ (W * a).T + (W @ c + b): the input BN's eval affine x * a + c, then the Linear.
        arrays = {"weight": (weight * scale[None, :]).T, "bias": weight @ shift + bias}
        return arrays, record
    conv = layer
    assert isinstance(conv, torch_nn.Conv2d)
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    if rank != 4 or conv.groups != 1 or conv.dilation != (1, 1) or isinstance(padding, str):
        raise _Skip(f"{layer_name} is not a plain Conv2d (groups 1, no dilation) on (n, C, H, W)")
    if conv.padding_mode != "zeros":
        raise _Skip(f"{layer_name} pads with {conv.padding_mode!r}, not zeros")
    if any(padding) and np.any(scale == 0):
        raise _Skip(f"{through} scales a channel by 0: no raw value pads like its zeros")
    record.update(map="conv2d", stride=tuple(conv.stride), padding=tuple(padding))
    arrays = {
        "weight": weight * scale[None, :, None, None],
        "bias": bias + np.einsum("oikl,i->o", weight, shift),
        # The raw value the input BN maps to 0, so that padding the raw input pads like zeros.
        "pad_value": -shift / np.where(scale == 0, 1.0, scale),
    }
    return arrays, record


def _input_affine(trace: _Trace, through: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``a``, ``c`` of the input BN's eval affine ``x * a + c`` (identity without one)."""
    if through is None or trace.input_bn is None:
        return np.ones(size), np.zeros(size)
    bn = trace.input_bn[1]
    if bn.running_mean is None or bn.running_var is None:
        raise _Skip(f"{through} normalizes with batch statistics")
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    gamma = np.ones(size) if bn.weight is None else bn.weight.detach().double().numpy()
    beta = np.zeros(size) if bn.bias is None else bn.bias.detach().double().numpy()
    scale = gamma / np.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _check_map(
    record: dict[str, Any],
    arrays: dict[str, np.ndarray],
    example: torch.Tensor,
    actual: torch.Tensor,
) -> None:
    """The map, as the server builds it from the file, must give what the BN received."""
    from service.monitor_maps import Conv2dMap, LinearMap

    f32 = {key: value.astype(np.float32) for key, value in arrays.items()}
    rows = example.detach().numpy().astype(np.float32)
    built: LinearMap | Conv2dMap
    if record["map"] == "linear":
        built = LinearMap(f32["weight"], f32["bias"])
    else:
        out_channels = f32["weight"].shape[0]
        built = Conv2dMap(
            weight=np.ascontiguousarray(f32["weight"].reshape(out_channels, -1).T),
            bias=f32["bias"],
            pad_value=f32["pad_value"],
            kernel=(f32["weight"].shape[2], f32["weight"].shape[3]),
            stride=record["stride"],
            padding=record["padding"],
            input_shape=(rows.shape[1], rows.shape[2], rows.shape[3]),
        )
    mapped = built.apply(rows)
    expected = actual.double().numpy()
    if expected.size == mapped.size:
        expected = expected.reshape(mapped.shape)
    bound = MAP_RTOL * max(1.0, float(np.abs(expected).max(initial=0.0)))
    if mapped.shape != expected.shape or not np.abs(mapped - expected).max() <= bound:
        raise _Skip("the composed map does not reproduce the layer's input (a custom forward?)")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def onnx_input_statistics(
    model: onnx.ModelProto, source: Source, input_name: str | None = None
) -> InputStatistics | None:
    """The statistics of the first BatchNormalization whose X is a data input of the graph
    (``input_name``: that one only, the first of several, which drift monitors)."""
    from foldserve.onnx_fold.graph import _Graph
    from foldserve.onnx_fold.statistics import _statistics

    graph = _Graph(model)
    inputs = {
        value.name: value
        for value in model.graph.input
        if value.name in graph.data_inputs and input_name in (None, value.name)
    }
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


def first_input(data: Calibration, inputs: Packing) -> Calibration:
    """The calibration of a model's first input alone, the one the drift reference describes
    (a model of several inputs has each sample's inputs side by side: ``service.packing``)."""
    if inputs.single or data.generated:
        return data
    first = inputs.part(np.asarray(data.samples[:], dtype=inputs.dtype), 0).astype(np.float32)
    return Calibration(first, data.description, generated=False)


def calibration_input_statistics(data: Calibration) -> InputStatistics | None:
    """The calibration data's own mean and variance per feature (per channel, spatial positions
    pooled, for (C, *spatial) samples): the drift monitor's reference for a model with no input
    BatchNorm (exporters that fold or decompose it leave none). None for generated inputs.

    One pass in steps (the data may be memory-mapped or decoded images), the steps' moments
    merged exactly (Chan et al.), in float64.
    """
    if data.generated:
        return None
    samples = data.samples
    shape = tuple(samples[:1].shape[1:])
    per_channel = len(shape) > 1
    count, mean, m2 = 0, np.zeros(0), np.zeros(0)
    step = rows_per_step(shape)
    for start in range(0, len(samples), step):
        chunk = np.asarray(samples[start : start + step], dtype=np.float64)
        values = chunk.reshape(len(chunk), shape[0], -1) if per_channel else chunk[..., None]
        values = values.transpose(1, 0, 2).reshape(values.shape[1], -1)  # (features, n)
        n = values.shape[1]
        chunk_mean = values.mean(axis=1)
        chunk_m2 = ((values - chunk_mean[:, None]) ** 2).sum(axis=1)
        if count == 0:
            count, mean, m2 = n, chunk_mean, chunk_m2
            continue
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * n / total
        m2 = m2 + chunk_m2 + delta**2 * count * n / total
        count = total
    if count == 0:
        return None
    return InputStatistics(
        layer="input",
        axis="channel" if per_channel else "feature",
        source="calibration",
        mean=_floats(mean),
        var=_floats(m2 / count),
        eps=0.0,
    )


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values.astype(np.float64))
