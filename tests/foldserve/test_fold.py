"""Folding as a property: random architectures with random frozen statistics keep their outputs.

Tolerance: float32 outputs of the folded model must be within ``1e-4 * max(1, max|reference|)`` of
the eval-mode original (observed differences are ~1e-6 relative; the margin covers deep chains).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from foldserve.affine import FrozenAffine
from foldserve.fold import FoldResult, fold_batch_norms
from service.errors import FoldingError
from service.store import Placement

RELATIVE_TOLERANCE = 1e-4
BATCH = 3
FOLD_SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

Expected = tuple[str, Placement, str | None]  # (BatchNorm name, placement, target)


# ---------------------------------------------------------------- helpers


def randomize_statistics(model: nn.Module, seed: int) -> None:
    """Non-trivial frozen statistics, so that every fold really rescales and shifts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm):
                continue
            features = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(features, generator=generator))
            module.running_var.copy_(0.2 + 3 * torch.rand(features, generator=generator))
            if module.affine:
                module.weight.copy_(1 + 0.5 * torch.randn(features, generator=generator))
                module.bias.copy_(torch.randn(features, generator=generator))


def batch_norm_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def fold_and_check(model: nn.Module, example: torch.Tensor, expected: list[Expected]) -> FoldResult:
    """Fold a train-mode model and assert every property the fold promises."""
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    names_before = batch_norm_names(model)

    result = fold_batch_norms(model, example)

    # The caller's model is untouched: same BatchNorms, same values, still training.
    assert batch_norm_names(model) == names_before
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)

    assert not any(isinstance(m, _BatchNorm) for m in result.module.modules())
    assert not result.module.training
    assert [(r.name, r.placement, r.target) for r in result.records] == expected
    modules = dict(model.named_modules())
    for record in result.records:
        batch_norm = modules[record.name]
        assert isinstance(batch_norm, _BatchNorm)
        assert record.features == batch_norm.num_features
        assert record.stats_sha256 == independent_stats_sha256(batch_norm)

    model.eval()
    inputs = torch.randn(5, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, folded = model(inputs), result.module(inputs)
    assert_close_scaled(folded, reference)
    return result


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max()))
    worst = float((actual - expected).abs().max())
    assert worst <= RELATIVE_TOLERANCE * scale, f"max diff {worst:.3g} at output scale {scale:.3g}"


def independent_stats_sha256(batch_norm: _BatchNorm) -> str:
    features = batch_norm.num_features
    weight = batch_norm.weight.detach() if batch_norm.affine else torch.ones(features)
    bias = batch_norm.bias.detach() if batch_norm.affine else torch.zeros(features)
    assert batch_norm.running_mean is not None and batch_norm.running_var is not None
    values = [
        batch_norm.running_mean.numpy(),
        batch_norm.running_var.numpy(),
        np.array([batch_norm.eps]),
        weight.numpy(),
        bias.numpy(),
    ]
    return hashlib.sha256(np.concatenate(values).astype("<f8").tobytes()).hexdigest()


# ---------------------------------------------------------------- chains (nn.Sequential)

Kind = Literal["layer", "bn", "relu", "other"]


@dataclass
class Chain:
    """A Sequential under construction, with what each BatchNorm should become."""

    layers: list[nn.Module]
    kinds: list[Kind]
    next_absorbs: list[bool]  # per layer: could it absorb a BatchNorm placed right before it?


def expected_placements(chain: Chain) -> list[Expected]:
    """The fold rules restated on a Sequential: previous layer, else next layer, else affine."""
    expected: list[Expected] = []
    survivor: tuple[Kind, int] = ("other", -1)  # the last op still in the folded graph
    for index, kind in enumerate(chain.kinds):
        if kind != "bn":
            survivor = (kind, index)
            continue
        following = index + 1
        if survivor[0] == "layer":
            expected.append((str(index), "folded_into_previous", str(survivor[1])))
        elif following < len(chain.kinds) and chain.next_absorbs[following]:
            expected.append((str(index), "folded_into_next", target_of(chain, following)))
        else:
            expected.append((str(index), "frozen_affine", None))
            survivor = ("other", index)
    return expected


def target_of(chain: Chain, index: int) -> str:
    # A Flatten absorbs through the Linear right after it.
    return str(index + 1) if isinstance(chain.layers[index], nn.Flatten) else str(index)


@st.composite
def mlp_chains(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...], list[Expected]]:
    """BN on the input, before and after Linear, after ReLU, as the output; affine or not."""
    in_features = features = draw(st.integers(3, 8))
    chain = Chain([], [], [])
    for op in draw(st.lists(st.sampled_from(["linear", "bn", "relu"]), min_size=1, max_size=6)):
        if op == "linear":
            out = draw(st.integers(2, 8))
            chain.layers.append(nn.Linear(features, out, bias=draw(st.booleans())))
            chain.kinds.append("layer")
            chain.next_absorbs.append(True)
            features = out
        elif op == "bn":
            chain.layers.append(nn.BatchNorm1d(features, affine=draw(st.booleans())))
            chain.kinds.append("bn")
            chain.next_absorbs.append(False)
        else:
            chain.layers.append(nn.ReLU())
            chain.kinds.append("relu")
            chain.next_absorbs.append(False)
    return nn.Sequential(*chain.layers), (BATCH, in_features), expected_placements(chain)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_START_SIZE = {1: (6, 10), 2: (4, 7), 3: (3, 4)}


@st.composite
def conv_chains(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...], list[Expected]]:
    """Conv (padded, grouped, depthwise), grouped ConvTranspose, BN, ReLU, flatten, Linear."""
    dims = draw(st.sampled_from([1, 2, 3]))
    channels = draw(st.sampled_from([2, 4, 6]))
    size = draw(st.integers(*_START_SIZE[dims]))
    input_shape = (BATCH, channels, *(size,) * dims)
    chain = Chain([], [], [])
    ops = ["conv", "conv_transpose", "bn", "bn", "relu"]
    for op in draw(st.lists(st.sampled_from(ops), min_size=1, max_size=5)):
        if op in ("conv", "conv_transpose"):
            out = draw(st.sampled_from([channels, 2 * channels, 2, 4, 6]))
            common = [g for g in range(1, channels + 1) if channels % g == 0 and out % g == 0]
            groups = draw(st.sampled_from(common))  # includes depthwise when out is a multiple
            kernel = draw(st.integers(1, min(3, size)))
            if op == "conv":
                padding = draw(st.sampled_from([0, 1])) if size > 1 else 0
                mode = draw(st.sampled_from(["zeros", "reflect"]))
                layer: nn.Module = _CONV[dims](
                    channels, out, kernel, padding=padding, groups=groups, padding_mode=mode
                )
                absorbs = padding == 0 or mode != "zeros"
                size = size - kernel + 1 + 2 * padding
            else:
                stride = draw(st.sampled_from([1, 2]))
                layer = _CONV_TRANSPOSE[dims](channels, out, kernel, stride=stride, groups=groups)
                absorbs = False  # a transposed conv's border sums make the shift non-uniform
                size = (size - 1) * stride + kernel
            chain.layers.append(layer)
            chain.kinds.append("layer")
            chain.next_absorbs.append(absorbs)
            channels = out
        elif op == "bn":
            affine = draw(st.booleans())
            chain.layers.append(_BATCH_NORM[dims](channels, affine=affine))
            chain.kinds.append("bn")
            chain.next_absorbs.append(False)
        else:
            chain.layers.append(nn.ReLU())
            chain.kinds.append("relu")
            chain.next_absorbs.append(False)
    if draw(st.booleans()):
        chain.layers += [nn.Flatten(), nn.Linear(channels * size**dims, 3)]
        chain.kinds += ["other", "layer"]
        chain.next_absorbs += [True, True]
    return nn.Sequential(*chain.layers), input_shape, expected_placements(chain)


@FOLD_SETTINGS
@given(spec=mlp_chains(), seed=st.integers(0, 2**16))
def test_mlp_chains_fold_exactly(
    spec: tuple[nn.Module, tuple[int, ...], list[Expected]], seed: int
) -> None:
    model, input_shape, expected = spec
    randomize_statistics(model, seed)
    fold_and_check(model, torch.randn(input_shape), expected)


@FOLD_SETTINGS
@given(spec=conv_chains(), seed=st.integers(0, 2**16))
def test_conv_chains_fold_exactly(
    spec: tuple[nn.Module, tuple[int, ...], list[Expected]], seed: int
) -> None:
    model, input_shape, expected = spec
    randomize_statistics(model, seed)
    fold_and_check(model, torch.randn(input_shape), expected)


# ---------------------------------------------------------------- residual blocks


class ResidualBlock(nn.Module):
    """Post- or pre-activation residual block, optionally with a BN on a tapped conv output and a
    BN -> 1x1 conv projection shortcut that reads the block input also used elsewhere."""

    def __init__(self, channels: int, pre_activation: bool, tap: bool, project: bool) -> None:
        super().__init__()
        self.pre_activation, self.tap, self.project = pre_activation, tap, project
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        if tap:
            self.tap_conv = nn.Conv2d(channels, channels, 1)
            self.tap_bn = nn.BatchNorm2d(channels, affine=False)
        if project:
            self.shortcut_bn = nn.BatchNorm2d(channels)
            self.shortcut = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tap:
            tapped = self.tap_conv(x)
            x = self.tap_bn(tapped) + tapped  # tap_conv's output has two users
        skip = self.shortcut(self.shortcut_bn(x)) if self.project else x
        if self.pre_activation:
            h = self.conv1(torch.relu(self.bn1(x)))
            h = self.conv2(torch.relu(self.bn2(h)))
            return h + skip
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + skip)

    def expected(self) -> list[Expected]:
        rows: list[Expected] = []
        if self.tap:
            rows.append(("tap_bn", "frozen_affine", None))
        if self.project:
            rows.append(("shortcut_bn", "folded_into_next", "shortcut"))
        if self.pre_activation:
            # bn1 reads the block input and feeds a ReLU; bn2 directly follows conv1.
            rows += [("bn1", "frozen_affine", None), ("bn2", "folded_into_previous", "conv1")]
        else:
            rows += [
                ("bn1", "folded_into_previous", "conv1"),
                ("bn2", "folded_into_previous", "conv2"),
            ]
        return rows


@FOLD_SETTINGS
@given(
    channels=st.sampled_from([2, 3, 4]),
    pre_activation=st.booleans(),
    tap=st.booleans(),
    project=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_residual_blocks_fold_exactly(
    channels: int, pre_activation: bool, tap: bool, project: bool, seed: int
) -> None:
    block = ResidualBlock(channels, pre_activation, tap, project)
    randomize_statistics(block, seed)
    fold_and_check(block, torch.randn(BATCH, channels, 5, 5), block.expected())


# ---------------------------------------------------------------- targeted cases


class FunctionalFlatten(nn.Module):
    def __init__(self, method: bool) -> None:
        super().__init__()
        self.method = method
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = self.bn(h)
        h = h.flatten(1) if self.method else torch.flatten(h, start_dim=1)
        return self.head(h)


@pytest.mark.parametrize("method", [True, False])
def test_bn_before_functional_flatten_folds_into_the_linear(method: bool) -> None:
    model = FunctionalFlatten(method)
    randomize_statistics(model, 7)
    fold_and_check(model, torch.randn(BATCH, 3, 4, 4), [("bn", "folded_into_next", "head")])


class SharedModules(nn.Module):
    """A conv called twice and a BatchNorm called twice: neither can be rewritten per call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 1)
        self.bn = nn.BatchNorm1d(3)
        self.out = nn.Conv1d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(self.conv(x))
        b = self.bn(self.conv(torch.relu(x)))
        return self.out(a) + b


def test_shared_layer_and_shared_batch_norm_become_one_affine() -> None:
    model = SharedModules()
    randomize_statistics(model, 3)
    result = fold_and_check(model, torch.randn(BATCH, 3, 6), [("bn", "frozen_affine", None)])
    assert isinstance(result.module.get_submodule("bn"), FrozenAffine)


def test_half_precision_layers_keep_their_dtype_and_fold_accurately() -> None:
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
    randomize_statistics(model, 11)
    reference = model.eval()
    inputs = torch.randn(4, 6)
    with torch.no_grad():
        expected = reference(inputs)
    result = fold_batch_norms(model.half(), inputs.half())
    linear = result.module.get_submodule("1")
    assert isinstance(linear, nn.Linear) and linear.weight.dtype == torch.float16
    with torch.no_grad():
        folded = result.module(inputs.half()).float()
    # NOTE: fp16 keeps ~3 decimal digits; one rounding of the folded weights stays within 1e-2.
    assert float((folded - expected).abs().max()) <= 1e-2 * max(1.0, float(expected.abs().max()))


def test_folded_model_exports_to_torchscript_and_onnx() -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    model = nn.Sequential(
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 8, 3, groups=2),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 11 * 11, 5),
    )
    randomize_statistics(model, 5)
    example = torch.randn(BATCH, 4, 7, 7)
    result = fold_batch_norms(model, example)
    placements = {r.placement for r in result.records}
    assert placements == {"folded_into_previous", "folded_into_next", "frozen_affine"}
    folded = result.module
    with torch.no_grad():
        expected = model.eval()(example)
    with warnings.catch_warnings():
        # TorchScript is deprecated but shipped; the exporter's dependencies warn about their own
        # internals. Neither is about the folded model.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(folded, example)
        program = torch.onnx.export(folded, (example,), dynamo=True, verbose=False)
    assert program is not None
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (onnx_output,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
    assert_close_scaled(traced(example), expected)
    assert_close_scaled(torch.from_numpy(onnx_output), expected)


# ---------------------------------------------------------------- refusals


class Nested(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.ReLU(), norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_refuses_batch_norm_without_running_statistics() -> None:
    model = Nested(nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(FoldingError, match=r"'head\.1'.*track_running_stats=False"):
        fold_batch_norms(model, torch.randn(BATCH, 4))


@pytest.mark.parametrize(
    ("attribute", "bad"),
    [("running_mean", float("inf")), ("running_var", float("nan")), ("weight", float("nan"))],
)
def test_refuses_non_finite_statistics(attribute: str, bad: float) -> None:
    norm = nn.BatchNorm1d(4)
    with torch.no_grad():
        getattr(norm, attribute)[2] = bad
    with pytest.raises(
        FoldingError, match=re.escape(f"'head.1' has non-finite values in {attribute}")
    ):
        fold_batch_norms(Nested(norm), torch.randn(BATCH, 4))


def test_refuses_an_example_of_one_sample() -> None:
    with pytest.raises(FoldingError, match="at least 2 samples"):
        fold_batch_norms(Nested(nn.BatchNorm1d(4)), torch.randn(1, 4))
