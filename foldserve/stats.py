"""Population BatchNorm statistics ("PreciseBN", Wu & Johnson 2021).

Training leaves each BN with an exponential moving average of batch statistics, gathered while the
weights were still moving. Here every BN gets the exact mean and biased variance of its input over
the whole training set under the final weights. BNs are done in forward order, each with every
earlier BN already frozen to its new statistics, so each layer sees the inputs it will see when
served.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from foldserve.tensors import Samples
from service.errors import FoldingError
from service.store import StatsShift


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


def batch_norm_calls(model: nn.Module, example: torch.Tensor) -> Counter[str]:
    """How often each BN module runs in one forward pass, in the order they first run."""
    names: dict[nn.Module, str] = {
        module: name for name, module in model.named_modules() if isinstance(module, _BatchNorm)
    }
    calls: Counter[str] = Counter()

    def record(module: nn.Module, _args: object) -> None:
        calls[names[module]] += 1

    handles = [module.register_forward_pre_hook(record) for module in names]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def batch_norms_in_forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the BN modules in the order a forward pass first calls them."""
    return list(batch_norm_calls(model, example))


@torch.no_grad()
def input_moments(
    model: nn.Module,
    name: str,
    x: Samples,
    batch_size: int = 256,
    progress: tqdm[None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and biased variance (float64) of BN ``name``'s input over ``x``.

    ``x`` may be a memory-mapped array: it is read ``batch_size`` samples at a time.
    """
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
            batch = np.array(x[start : start + batch_size], dtype=np.float32)  # a writable copy
            with contextlib.suppress(_StopForward):
                model(torch.from_numpy(batch))
            if progress is not None:
                progress.update(len(batch))
    finally:
        handle.remove()
    if moments is None:
        raise ValueError(f"BatchNorm {name!r} never ran on the training inputs")
    return moments.mean, moments.variance


def set_population_statistics(
    model: nn.Module, x: Samples, batch_size: int = 256, *, progress: bool = False
) -> dict[str, StatsShift]:
    """Replace every BN's running mean and variance in place, layer after layer.

    Returns, per BN in forward order, how far its statistics moved from the running ones.
    Refuses a BN called at several places per forward pass: the statistics of one call site
    depend on the BN's own output at an earlier one, so no layer-by-layer order exists.
    """
    calls = batch_norm_calls(model, torch.from_numpy(np.array(x[:2], dtype=np.float32)))
    shared = [f"{name} ({count} calls)" for name, count in calls.items() if count > 1]
    if shared:
        raise FoldingError(
            f"BatchNorm modules called at several places per forward: {', '.join(shared)}; "
            "population statistics are defined per call site, so use the running estimates "
            "(--bn-stats ema) or give each call site its own BatchNorm"
        )
    shifts: dict[str, StatsShift] = {}
    bar = tqdm(
        total=len(calls) * len(x),
        desc="population statistics",
        unit="sample",
        disable=not progress,
        leave=False,
    )
    with bar:
        for name in calls:
            batch_norm = model.get_submodule(name)
            assert isinstance(batch_norm, _BatchNorm)
            if batch_norm.running_mean is None or batch_norm.running_var is None:
                raise FoldingError(
                    f"BatchNorm {name!r} keeps no running statistics to replace "
                    "(track_running_stats=False)"
                )
            bar.set_postfix_str(name, refresh=False)
            mean, var = input_moments(model, name, x, batch_size, bar if progress else None)
            shifts[name] = stats_shift(batch_norm, mean, var)
            batch_norm.running_mean.copy_(mean.to(batch_norm.running_mean.dtype))
            batch_norm.running_var.copy_(var.to(batch_norm.running_var.dtype))
    return shifts


def stats_shift(batch_norm: _BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> StatsShift:
    """How far ``mean``/``var`` are from the BN's running statistics, in running-std units."""
    assert batch_norm.running_mean is not None and batch_norm.running_var is not None
    old_mean = batch_norm.running_mean.double()
    old_var = batch_norm.running_var.double() + batch_norm.eps
    new_var = var.double() + batch_norm.eps
    mean_shift = ((mean.double() - old_mean).abs() / old_var.sqrt()).max()
    log_ratio = (new_var / old_var).log().abs().max()
    # Both finite: running_var + eps > 0 and finite statistics are checked before folding.
    return StatsShift(max_mean_shift=float(mean_shift), max_abs_log_var_ratio=float(log_ratio))
