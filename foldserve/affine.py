"""A frozen BatchNorm as a per-channel affine map ``y = x * scale + shift``, and the arithmetic that
absorbs such a map into the Linear or Conv layer before or after it.

NOTE: all arithmetic runs in float64 and is cast back to the layer's dtype once at the end, so an
fp16 layer is rounded a single time instead of at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ConvLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d
TransposedConvLayer = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d
PreviousLayer = nn.Linear | ConvLayer | TransposedConvLayer
NextLayer = nn.Linear | ConvLayer


@dataclass(frozen=True)
class ChannelAffine:
    """``y[:, c, ...] = x[:, c, ...] * scale[c] + shift[c]``; both float64 vectors of length C."""

    scale: torch.Tensor
    shift: torch.Tensor

    def repeat_each(self, times: int) -> ChannelAffine:
        """The same map seen after ``flatten(start_dim=1)``: channel c owns ``times`` positions."""
        return ChannelAffine(
            self.scale.repeat_interleave(times), self.shift.repeat_interleave(times)
        )


class FrozenAffine(nn.Module):
    """A BatchNorm that could not be folded away, reduced to constants (no statistics, no eps).

    The buffers are shaped ``(C, 1, ..., 1)`` so they broadcast over ``(N, C, *spatial)`` with
    plain Mul and Add ops, which every exporter and runtime understands.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, affine: ChannelAffine, input_rank: int, dtype: torch.dtype) -> None:
        super().__init__()
        broadcast_shape = (-1,) + (1,) * (input_rank - 2)
        self.register_buffer("scale", affine.scale.reshape(broadcast_shape).to(dtype))
        self.register_buffer("shift", affine.shift.reshape(broadcast_shape).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"features={self.scale.shape[0]}"


def absorb_into_previous(layer: PreviousLayer, affine: ChannelAffine) -> None:
    """Rewrite ``layer`` so that ``layer(x)`` computes ``affine(old_layer(x))``.

    The affine acts on the layer's output channels: scale each output channel's weights and bias.
    """
    weight = layer.weight.detach().double()
    if isinstance(layer, TransposedConvLayer):
        # Transposed weights are (in, out/groups, *k): output channel g*(out/groups)+j lives in
        # column j of the rows of group g, so the scale is laid out per group.
        factor = _grouped_layout(affine.scale, layer.groups, rows=weight.shape[0])
    else:
        # Linear (out, in) and Conv (out, in/groups, *k): output channels are the rows.
        factor = affine.scale.reshape(-1, 1)
    new_weight = weight * _with_kernel_dims(factor, weight.dim())
    new_bias = _bias_or_zeros(layer, affine.scale.numel()) * affine.scale + affine.shift
    _assign(layer, new_weight, new_bias)


def absorb_into_next(layer: NextLayer, affine: ChannelAffine) -> None:
    """Rewrite ``layer`` so that ``layer(x)`` computes ``old_layer(affine(x))``.

    The affine acts on the layer's input channels. Exact for Linear and for a Conv that never pads
    with zeros (a zero pad of the normalized signal is not the affine of a zero pad).
    """
    weight = layer.weight.detach().double()
    # Linear (out, in) and Conv (out, in/groups, *k): row o reads input channel g*(in/groups)+c in
    # column c, where g is o's group (a Linear is a single group).
    groups = 1 if isinstance(layer, nn.Linear) else layer.groups
    rows = weight.shape[0]
    scale = _with_kernel_dims(_grouped_layout(affine.scale, groups, rows), weight.dim())
    shift = _with_kernel_dims(_grouped_layout(affine.shift, groups, rows), weight.dim())
    shift_response = (weight * shift).flatten(start_dim=1).sum(dim=1)
    _assign(layer, weight * scale, _bias_or_zeros(layer, rows) + shift_response)


def _grouped_layout(vector: torch.Tensor, groups: int, rows: int) -> torch.Tensor:
    """Lay a per-channel vector over a grouped weight's first two dims as a (rows, cols) matrix.

    Row r belongs to group ``r // (rows / groups)``; column c of that row is channel
    ``group * cols + c`` of the vector, with ``cols = len(vector) / groups``.
    """
    cols = vector.numel() // groups
    per_group = vector.reshape(groups, 1, cols).expand(groups, rows // groups, cols)
    return per_group.reshape(rows, cols)


def _with_kernel_dims(factor: torch.Tensor, weight_rank: int) -> torch.Tensor:
    return factor.reshape(*factor.shape, *(1,) * (weight_rank - factor.dim()))


def _bias_or_zeros(layer: PreviousLayer, features: int) -> torch.Tensor:
    if layer.bias is None:
        return torch.zeros(features, dtype=torch.float64, device=layer.weight.device)
    return layer.bias.detach().double()


def _assign(layer: PreviousLayer, weight: torch.Tensor, bias: torch.Tensor) -> None:
    # New Parameter objects rather than in-place edits: a weight tied to another layer keeps its
    # old values there, and the layer gains a bias if it had none.
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)
