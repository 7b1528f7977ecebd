"""Population BatchNorm statistics ("PreciseBN", Wu & Johnson 2021).

Training leaves each BN with an exponential moving average of batch statistics, gathered while the
weights were still moving. Here every BN gets the exact mean and biased variance of its input over
the whole training set under the final weights. BNs are done in forward order, each with every
earlier BN already frozen to its new statistics, so each layer sees the inputs it will see when
served.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from foldserve.demos.data import Features


@dataclass
class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations (M2), merged batch by batch."""

    count: int
    mean: torch.Tensor  # (C,) float64
    m2: torch.Tensor  # (C,) float64

    @classmethod
    def empty(cls, channels: int) -> ChannelMoments:
        zeros = torch.zeros(channels, dtype=torch.float64)
        return cls(0, zeros, zeros.clone())

    @property
    def variance(self) -> torch.Tensor:
        """The biased (population) variance: M2 / count."""
        return self.m2 / self.count

    def merge(self, batch: torch.Tensor) -> None:
        # (N, C, *spatial) -> (C, N * prod(spatial)) in float64, then Chan et al.'s parallel
        # update: stable where a single sum of squares would cancel for large means.
        values = batch.detach().double().transpose(0, 1).reshape(batch.shape[1], -1)
        n = values.shape[1]
        batch_mean = values.mean(dim=1)
        batch_m2 = ((values - batch_mean[:, None]) ** 2).sum(dim=1)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total


class _StopForward(Exception):
    """Raised by the hook once a BN's input is captured: later layers need not run."""


def batch_norms_in_forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the BN modules in the order a forward pass first calls them."""
    names: dict[nn.Module, str] = {
        module: name for name, module in model.named_modules() if isinstance(module, _BatchNorm)
    }
    order: list[str] = []

    def record(module: nn.Module, _args: object) -> None:
        if names[module] not in order:
            order.append(names[module])

    handles = [module.register_forward_pre_hook(record) for module in names]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def input_moments(
    model: nn.Module, name: str, x: Features, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and biased variance (float64) of BN ``name``'s input over ``x``."""
    batch_norm = model.get_submodule(name)
    moments: ChannelMoments | None = None

    def capture(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal moments
        if moments is None:
            moments = ChannelMoments.empty(args[0].shape[1])
        moments.merge(args[0])
        raise _StopForward

    handle = batch_norm.register_forward_pre_hook(capture)
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            with contextlib.suppress(_StopForward):
                model(torch.from_numpy(x[start : start + batch_size]))
    finally:
        handle.remove()
    if moments is None:
        raise ValueError(f"BatchNorm {name!r} never ran on the training inputs")
    return moments.mean, moments.variance


def set_population_statistics(model: nn.Module, x: Features, batch_size: int = 256) -> list[str]:
    """Replace every BN's running mean and variance in place; returns the BN names in order."""
    # NOTE: the hook stops the forward at the first call of a BN; a BN called twice per forward
    # would be seen at its first call site only, and we do not build such networks.
    order = batch_norms_in_forward_order(model, torch.from_numpy(x[:2]))
    for name in order:
        batch_norm = model.get_submodule(name)
        assert isinstance(batch_norm, _BatchNorm)
        if batch_norm.running_mean is None or batch_norm.running_var is None:
            raise ValueError(f"BatchNorm {name!r} keeps no running statistics to replace")
        mean, var = input_moments(model, name, x, batch_size)
        batch_norm.running_mean.copy_(mean.to(batch_norm.running_mean.dtype))
        batch_norm.running_var.copy_(var.to(batch_norm.running_var.dtype))
    return order
