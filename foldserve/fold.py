"""Fold every BatchNorm of a trained network away: the exported model never sees batch statistics.

Each BatchNorm, in graph order, goes to the first place that keeps the outputs exact:

1. ``folded_into_previous``: its input comes from a Linear / Conv / ConvTranspose whose output
   feeds nothing else; the normalization scales that layer's output channels.
2. ``folded_into_next``: its output feeds only a Linear (2-D input), a Conv that never zero-pads,
   or a ``flatten(start_dim=1)`` feeding only a Linear; the normalization scales input channels.
3. ``frozen_affine``: otherwise it becomes ``x * scale + shift`` with constant buffers.

The work happens on an eval-mode deep copy traced with torch.fx; the caller's model is untouched.
On that copy, weight and spectral norms (hooks or parametrizations) are baked into plain weights
first; any other module hook is refused, since tracing would silently drop or misplace it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from math import prod

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from foldserve.affine import (
    ChannelAffine,
    FrozenAffine,
    NextLayer,
    PreviousLayer,
    absorb_into_next,
    absorb_into_previous,
)
from service.errors import FoldingError
from service.store import BatchNormRecord, Placement

# NOTE: exact types, not isinstance: a subclass may override forward (weight standardization,
# masking), and then rewriting its weights would no longer be exact.
_PREVIOUS_LAYER_TYPES: frozenset[type[nn.Module]] = frozenset(
    {
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    }
)
_NEXT_LAYER_TYPES: frozenset[type[nn.Module]] = frozenset(
    {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d}
)


class UntraceableError(FoldingError):
    """torch.fx cannot trace the model faithfully; the ONNX-level fold may still work."""


@dataclass(frozen=True)
class FoldResult:
    module: nn.Module  # eval-mode, no BatchNorm module left, same outputs as the eval-mode input
    records: tuple[BatchNormRecord, ...]  # one per BatchNorm of the original, in graph order


Examples = torch.Tensor | tuple[torch.Tensor, ...]  # one input's batch, or one per input


def as_examples(example: Examples) -> tuple[torch.Tensor, ...]:
    """One batch per input of the model, each of at least 2 samples."""
    examples = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if not examples or any(e.dim() < 2 or e.shape[0] < 2 for e in examples):
        raise FoldingError(
            f"example must be a batch of at least 2 samples, got shape {_shapes(examples)}"
        )
    return examples


def _shapes(examples: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(str(tuple(e.shape)) for e in examples) or "no tensor"


def fold_batch_norms(model: nn.Module, example: Examples) -> FoldResult:
    """Fold or freeze every BatchNorm of ``model``; ``example`` (batch >= 2; one per input of a
    model of several) fixes the shapes."""
    graph_module = _trace_eval_copy(model, example)
    graph = _GraphFacts(graph_module)
    records: list[BatchNormRecord] = []
    seen: set[str] = set()  # a BatchNorm called at several sites is placed (and recorded) once
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or node.target in seen:
            continue
        batch_norm = graph_module.get_submodule(node.target)
        if not isinstance(batch_norm, _BatchNorm):
            continue
        seen.add(node.target)
        affine = frozen_channel_affine(node.target, batch_norm)
        placement, target = _place(graph_module, graph, node, affine)
        records.append(
            BatchNormRecord(
                name=node.target,
                features=batch_norm.num_features,
                placement=placement,
                target=target,
                stats_sha256=stats_sha256(batch_norm),
            )
        )
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    _check_no_batch_norm_left(graph_module)
    return FoldResult(module=graph_module.eval(), records=tuple(records))


def frozen_channel_affine(name: str, batch_norm: _BatchNorm) -> ChannelAffine:
    """The eval-mode BatchNorm as ``x * s + t`` in float64; refuses anything using batch stats."""
    mean, var = batch_norm.running_mean, batch_norm.running_var
    if not batch_norm.track_running_stats or mean is None or var is None:
        raise FoldingError(
            f"BatchNorm {name!r} has no running statistics (track_running_stats=False): it would "
            "normalize with batch statistics at serving time; build it with "
            "track_running_stats=True and recompute its statistics before exporting"
        )
    weight, bias = _weight_and_bias(batch_norm)
    named = {"running_mean": mean, "running_var": var, "weight": weight, "bias": bias}
    for label, values in named.items():
        if not torch.isfinite(values).all():
            raise FoldingError(f"BatchNorm {name!r} has non-finite values in {label}")
    denominator = var.double() + batch_norm.eps
    if not (denominator > 0).all():
        raise FoldingError(f"BatchNorm {name!r} has running_var + eps <= 0")
    scale = weight.double() / torch.sqrt(denominator)
    return ChannelAffine(scale=scale, shift=bias.double() - mean.double() * scale)


def stats_sha256(batch_norm: _BatchNorm) -> str:
    """sha256 of the float64 little-endian running_mean, running_var, eps, weight, bias."""
    weight, bias = _weight_and_bias(batch_norm)
    digest = hashlib.sha256()
    parts = (
        batch_norm.running_mean,
        batch_norm.running_var,
        torch.tensor(batch_norm.eps, dtype=torch.float64),
    )
    for values in (*parts, weight, bias):
        assert values is not None  # refused earlier by frozen_channel_affine
        digest.update(values.detach().cpu().double().numpy().astype("<f8").tobytes())
    return digest.hexdigest()


def _weight_and_bias(batch_norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if batch_norm.affine and batch_norm.weight is not None and batch_norm.bias is not None:
        return batch_norm.weight.detach(), batch_norm.bias.detach()
    # affine=False normalizes only: weight 1, bias 0.
    features = batch_norm.num_features
    return torch.ones(features, dtype=torch.float64), torch.zeros(features, dtype=torch.float64)


def _trace_eval_copy(model: nn.Module, example: Examples) -> fx.GraphModule:
    examples = as_examples(example)
    # NOTE: eval before tracing, so `self.training` branches and functional dropout are traced in
    # their inference form.
    copy = prepare_eval_copy(model)
    with torch.no_grad():
        try:
            expected = copy(*examples)
        except Exception as exc:
            raise FoldingError(
                f"example of shape {_shapes(examples)} does not run through the model: {exc}"
            ) from exc
    try:
        graph_module = fx.symbolic_trace(copy)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise UntraceableError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    _refuse_functional_batch_norm(graph_module)
    try:
        with torch.no_grad():
            traced = ShapeProp(graph_module).propagate(*examples)
    except Exception as exc:
        raise UntraceableError(
            f"torch.fx traced {type(model).__name__} into a program that does not run on the "
            f"example (data-dependent control flow?): {exc}"
        ) from exc
    _check_trace_is_faithful(type(model).__name__, expected, traced)
    return graph_module


def prepare_eval_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy with weight/spectral norms baked in; refuses any other hook."""
    copy = deepcopy(model).eval()
    bake_weight_reparametrizations(copy)
    refuse_hooks(copy)
    return copy


def bake_weight_reparametrizations(model: nn.Module) -> list[str]:
    """Replace weight_norm / spectral_norm by the weight they compute now (eval: no power step).

    Covers the old hook-based utilities and ``torch.nn.utils.parametrizations``. Returns what was
    baked, as ``module.parameter`` names.
    """
    baked: list[str] = []
    for name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                remove_weight_norm(module, hook.name)
                baked.append(f"{name}.{hook.name} (weight_norm)")
            elif isinstance(hook, SpectralNorm):
                remove_spectral_norm(module, hook.name)
                baked.append(f"{name}.{hook.name} (spectral_norm)")
        if parametrize.is_parametrized(module):
            # NOTE: a deep copy shares the dynamically made Parametrized<Layer> class with the
            # original, and removing a parametrization deletes its property from that class:
            # the caller's model would lose its weight. This copy gets a class of its own first.
            shared = type(module)
            module.__class__ = type(shared.__name__, shared.__bases__, dict(shared.__dict__))
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
                baked.append(f"{name}.{tensor_name} (parametrization)")
    return baked


def refuse_hooks(model: nn.Module) -> None:
    """Forward hooks change what a module computes, and a traced graph drops or misplaces them."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        raise FoldingError(
            "global forward hooks are registered (torch.nn.modules.module."
            "register_module_forward_hook): remove them before exporting"
        )
    hooked = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks
    ]
    if hooked:
        raise FoldingError(
            f"forward hooks on {', '.join(hooked[:5])}{' ...' if len(hooked) > 5 else ''}: "
            "folding cannot keep what a hook does to a layer's input or output; remove the hooks "
            "(handle.remove()) or move their computation into forward()"
        )


def _check_trace_is_faithful(name: str, expected: object, traced: object) -> None:
    outputs, traced_outputs = _tensors(name, expected), _tensors(name, traced)
    if len(outputs) != len(traced_outputs):
        raise UntraceableError(f"torch.fx traced {name} into a program of other outputs")
    for output, traced_output in zip(outputs, traced_outputs, strict=True):
        _check_same_output(name, output, traced_output)


def _tensors(name: str, result: object) -> list[torch.Tensor]:
    """A forward's outputs: one tensor, or a tuple of them (``foldserve.several.Named``)."""
    items = [result] if isinstance(result, torch.Tensor) else result
    if not isinstance(items, tuple | list) or not all(isinstance(t, torch.Tensor) for t in items):
        raise FoldingError(f"{name} must return one tensor, got {type(result).__name__}")
    return list(items)


def _check_same_output(name: str, expected: torch.Tensor, traced: torch.Tensor) -> None:
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    # NOTE: non-finite outputs must match too (isclose: inf == inf, NaN == NaN); refusing them
    # is the statistics checks' job, with a better message.
    same = expected.shape == traced.shape and bool(
        torch.isclose(traced, expected, rtol=0.0, atol=1e-5 * (1.0 + scale), equal_nan=True).all()
    )
    if not same:
        raise UntraceableError(
            f"torch.fx traced {name} into a program whose outputs differ from its forward() "
            "(data-dependent control flow is fixed at trace time)"
        )


def _refuse_functional_batch_norm(graph_module: fx.GraphModule) -> None:
    functional = {torch.nn.functional.batch_norm, torch.batch_norm}
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in functional:
            raise FoldingError(
                f"node {node.name!r} calls batch_norm functionally; use an nn.BatchNorm module "
                "so its statistics can be frozen and folded"
            )


class _GraphFacts:
    """What decides whether a layer may be rewritten: is it called once and never read directly."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        nodes = graph_module.graph.nodes
        self.modules: dict[str, nn.Module] = dict(graph_module.named_modules())
        self.call_sites = Counter(n.target for n in nodes if n.op == "call_module")
        self.read_attributes = [n.target for n in nodes if n.op == "get_attr"]

    def exclusive_layer(
        self, node: fx.Node, allowed: frozenset[type[nn.Module]]
    ) -> nn.Module | None:
        """The layer ``node`` calls, if its type is allowed and a rewrite affects only ``node``."""
        if node.op != "call_module" or node.args[1:] or node.kwargs:
            return None
        layer = self.modules[str(node.target)]
        if type(layer) not in allowed or self.call_sites[node.target] != 1:
            return None
        if any(attr.startswith(f"{node.target}.") for attr in self.read_attributes):
            return None
        return layer


def _place(
    graph_module: fx.GraphModule, graph: _GraphFacts, node: fx.Node, affine: ChannelAffine
) -> tuple[Placement, str | None]:
    name = str(node.target)
    if graph.call_sites[name] == 1:
        previous = _previous_layer(graph, node)
        if previous is not None:
            absorb_into_previous(previous[1], affine)
            _bypass(graph_module, node)
            return "folded_into_previous", previous[0]
        following = _next_layer(graph, node)
        if following is not None:
            target, layer, repeat = following
            absorb_into_next(layer, affine.repeat_each(repeat))
            _bypass(graph_module, node)
            return "folded_into_next", target
    _freeze_in_place(graph_module, name, affine)
    return "frozen_affine", None


def _previous_layer(graph: _GraphFacts, node: fx.Node) -> tuple[str, PreviousLayer] | None:
    source = node.args[0]
    if not isinstance(source, fx.Node) or len(source.users) != 1:
        return None  # a shared output (residual tap) must keep its unnormalized values
    layer = graph.exclusive_layer(source, _PREVIOUS_LAYER_TYPES)
    if not isinstance(layer, PreviousLayer):
        return None
    # A Linear scales its last dim, the BatchNorm its dim 1: they agree only on (N, C).
    if isinstance(layer, nn.Linear) and len(_shape(node)) != 2:
        return None
    return str(source.target), layer


def _next_layer(graph: _GraphFacts, node: fx.Node) -> tuple[str, NextLayer, int] | None:
    """The layer that can absorb the BatchNorm on its input side, and positions per channel."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.args[:1] != (node,):
        return None
    input_shape = _shape(node)
    flattened = _flatten_positions(graph, user, input_shape)
    if flattened is not None:
        if len(user.users) != 1:
            return None
        (linear_node,) = user.users
        layer = graph.exclusive_layer(linear_node, frozenset({nn.Linear}))
        if not isinstance(layer, nn.Linear) or linear_node.args[:1] != (user,):
            return None
        return str(linear_node.target), layer, flattened
    layer = graph.exclusive_layer(user, _NEXT_LAYER_TYPES)
    if not isinstance(layer, NextLayer):
        return None
    if isinstance(layer, nn.Linear):
        fits = len(input_shape) == 2
    else:
        fits = len(input_shape) == layer.weight.dim() and _never_zero_pads(layer)
    return (str(user.target), layer, 1) if fits else None


def _flatten_positions(
    graph: _GraphFacts, node: fx.Node, input_shape: tuple[int, ...]
) -> int | None:
    """Positions per channel if ``node`` is ``flatten(start_dim=1)`` of a (N, C, *spatial) input."""
    is_flatten = (
        (node.op == "call_function" and node.target is torch.flatten)
        or (node.op == "call_method" and node.target == "flatten")
        or (node.op == "call_module" and type(graph.modules[str(node.target)]) is nn.Flatten)
    )
    if not is_flatten:
        return None
    # The traced output shape settles which dims were flattened, whatever the argument spelling.
    positions = prod(input_shape[2:])
    if _shape(node) != (input_shape[0], input_shape[1] * positions):
        return None
    return positions


def _never_zero_pads(conv: nn.Module) -> bool:
    # Reflect, replicate and circular pads copy values of the same channel, so they commute with a
    # per-channel affine; zero padding does not (the pad would have to be -shift/scale).
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return True
    padding = getattr(conv, "padding", "same")
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in padding)


def _shape(node: fx.Node) -> tuple[int, ...]:
    """The shape ShapeProp recorded for ``node``'s output; () when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _bypass(graph_module: fx.GraphModule, node: fx.Node) -> None:
    """Remove a folded BatchNorm node: its users now read its input directly."""
    source = node.args[0]
    assert isinstance(source, fx.Node)
    node.replace_all_uses_with(source)
    graph_module.graph.erase_node(node)


def _freeze_in_place(graph_module: fx.GraphModule, name: str, affine: ChannelAffine) -> None:
    """Swap the BatchNorm module for a FrozenAffine under the same name, at every call site."""
    batch_norm = graph_module.get_submodule(name)
    assert isinstance(batch_norm, _BatchNorm)
    sites = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == name]
    ranks = {len(_shape(n)) for n in sites}
    if len(ranks) != 1:
        raise FoldingError(f"BatchNorm {name!r} is called on inputs of different ranks {ranks}")
    dtype = batch_norm.running_mean.dtype if batch_norm.running_mean is not None else torch.float32
    graph_module.set_submodule(name, FrozenAffine(affine, ranks.pop(), dtype))


def _check_no_batch_norm_left(graph_module: fx.GraphModule) -> None:
    left = [name for name, m in graph_module.named_modules() if isinstance(m, _BatchNorm)]
    if left:
        raise FoldingError(f"BatchNorm modules still referenced after folding: {', '.join(left)}")
