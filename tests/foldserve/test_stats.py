from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from foldserve.demos.build import PipelineResult, run
from foldserve.demos.data import Dataset
from foldserve.demos.train import TrainConfig
from foldserve.stats import ChannelMoments, batch_norms_in_forward_order, set_population_statistics

from .conftest import TINY_EPOCHS


def _batch_norm(model: nn.Module, name: str) -> nn.BatchNorm1d | nn.BatchNorm2d:
    module = model.get_submodule(name)
    assert isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
    return module


def _assert_stats(bn: nn.Module, values: torch.Tensor, channel_dims: tuple[int, ...]) -> None:
    """``bn``'s running stats are the float64 mean and biased variance of ``values``."""
    assert isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    values = values.double()
    mean = values.mean(dim=channel_dims)
    var = values.var(dim=channel_dims, unbiased=False)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_mlp_population_stats_equal_a_direct_computation(
    trained_mlp: nn.Module, digits_flat: Dataset
) -> None:
    model = copy.deepcopy(trained_mlp)
    # A batch size that does not divide the set: the per-batch merging must still be exact.
    order = list(set_population_statistics(model, digits_flat.x_train, batch_size=100))
    assert order == ["input_norm", "body.1", "body.4"]
    x = torch.from_numpy(digits_flat.x_train)
    _assert_stats(model.input_norm, x, (0,))
    # Each later BN sees its input under the earlier BNs' *new* statistics.
    body = model.body
    first_hidden = body[0](model.input_norm(x))
    _assert_stats(body[1], first_hidden, (0,))
    second_hidden = body[3](body[2](body[1](first_hidden)))
    _assert_stats(body[4], second_hidden, (0,))


@torch.no_grad()
def test_cnn_population_stats_equal_a_direct_computation(
    trained_cnn: nn.Module, digits_images: Dataset
) -> None:
    model = copy.deepcopy(trained_cnn)
    order = list(set_population_statistics(model, digits_images.x_train, batch_size=300))
    assert order == ["input_norm", "stem.1", "post_act.2", "residual.bn1", "residual.bn2"]
    # Direct: one eval pass over the whole set at once, capturing every BN's input.
    captured: dict[str, torch.Tensor] = {}
    handles = [
        _batch_norm(model, name).register_forward_pre_hook(
            lambda _m, args, name=name: captured.__setitem__(name, args[0])
        )
        for name in order
    ]
    model.eval()(torch.from_numpy(digits_images.x_train))
    for handle in handles:
        handle.remove()
    for name in order:
        _assert_stats(_batch_norm(model, name), captured[name], (0, 2, 3))


def test_population_stats_differ_from_the_ema(trained_mlp: nn.Module, digits_flat: Dataset) -> None:
    model = copy.deepcopy(trained_mlp)
    set_population_statistics(model, digits_flat.x_train)
    before, after = _batch_norm(trained_mlp, "body.4"), _batch_norm(model, "body.4")
    assert before.running_var is not None and after.running_var is not None
    assert not torch.allclose(before.running_var, after.running_var)


def test_forward_order_follows_calls_not_attribute_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.BatchNorm1d(4)
            self.early = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(self.early(x))

    assert batch_norms_in_forward_order(Reversed(), torch.randn(3, 4)) == ["early", "late"]


@settings(max_examples=50, deadline=None)
@given(
    values=arrays(
        np.float64,
        st.tuples(st.integers(2, 40), st.integers(1, 5)),
        elements=st.floats(-1e3, 1e3, allow_nan=False),
    ).map(lambda a: a + 1e4),  # a large common offset: naive sums of squares would cancel
    cuts=st.lists(st.integers(1, 39), max_size=4),
)
def test_merged_moments_equal_whole_set_moments(values: np.ndarray, cuts: list[int]) -> None:
    data = torch.from_numpy(values)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    moments = ChannelMoments.empty(data.shape[1])
    for start, stop in itertools.pairwise(bounds):
        moments.merge(data[start:stop])
    torch.testing.assert_close(moments.mean, data.mean(dim=0))
    torch.testing.assert_close(moments.variance, data.var(dim=0, unbiased=False))


def test_manifest_records_both_accuracies_under_ema_and_population(
    stored_twice: tuple[PipelineResult, PipelineResult], tmp_path: Path
) -> None:
    population, _ = stored_twice
    ema = run(
        TrainConfig(arch="digits-mlp", epochs=TINY_EPOCHS, bn_stats="ema"), tmp_path, progress=False
    )
    for result in (population, ema):
        provenance = result.manifest.provenance
        assert 0.5 < provenance.accuracy_ema <= 1.0
        assert 0.5 < provenance.accuracy_population <= 1.0
    # Same seed, same weights: both runs measure the same two numbers ...
    assert ema.manifest.provenance.accuracy_ema == population.manifest.provenance.accuracy_ema
    assert (
        ema.manifest.provenance.accuracy_population
        == population.manifest.provenance.accuracy_population
    )
    # ... but each exports, and reports, its own choice of statistics.
    assert ema.manifest.provenance.bn_stats == "ema"
    assert (
        ema.manifest.provenance.accuracy_unfolded_exported_stats
        == ema.manifest.provenance.accuracy_ema
    )
    assert (
        population.manifest.provenance.accuracy_unfolded_exported_stats
        == population.manifest.provenance.accuracy_population
    )
    ema_hashes = [bn.stats_sha256 for bn in ema.manifest.batch_norm]
    population_hashes = [bn.stats_sha256 for bn in population.manifest.batch_norm]
    assert len(ema_hashes) == 3
    assert all(a != b for a, b in zip(ema_hashes, population_hashes, strict=True))
