"""Folding real third-party architectures (MONAI, efficientnet-pytorch), randomly initialized,
with non-trivial statistics from a few train-mode passes, at small input sizes."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from foldserve.fold import UntraceableError, fold_batch_norms
from foldserve.pipeline import fold_and_serialize

with warnings.catch_warnings():
    # monai probes optional packages at import and warns about their absence.
    warnings.simplefilter("ignore")
    from efficientnet_pytorch import EfficientNet
    from monai.networks import nets


def _efficientnet_pytorch() -> nn.Module:
    return EfficientNet.from_name("efficientnet-b0", num_classes=5, image_size=32)


# name -> (builder, one sample's shape, fx can trace it faithfully)
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "monai-resnet18-2d": (
        lambda: nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=5),
        (3, 32, 32),
        True,
    ),
    "monai-densenet121-2d": (
        lambda: nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=5),
        (3, 32, 32),
        True,
    ),
    "monai-seresnet50-2d": (
        lambda: nets.SEResNet50(spatial_dims=2, in_channels=3, num_classes=5),
        (3, 64, 64),
        True,
    ),
    "monai-efficientnet-b0-2d": (
        lambda: nets.EfficientNetBN(
            "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=5
        ),
        (3, 32, 32),
        True,
    ),
    "monai-unet-3d": (
        lambda: nets.UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            channels=(8, 16, 32),
            strides=(2, 2),
            norm="batch",
        ),
        (1, 16, 16, 16),
        True,
    ),
    "monai-segresnet-2d": (
        lambda: nets.SegResNet(
            spatial_dims=2, in_channels=1, out_channels=2, norm="batch", init_filters=8
        ),
        (1, 32, 32),
        True,
    ),
    "monai-dynunet-2d": (
        lambda: nets.DynUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            kernel_size=[3, 3, 3],
            strides=[1, 2, 2],
            upsample_kernel_size=[2, 2],
            norm_name="batch",
        ),
        (1, 32, 32),
        True,
    ),
    "monai-basicunet-2d": (
        lambda: nets.BasicUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            norm="batch",
            features=(8, 8, 16, 32, 64, 8),
        ),
        (1, 32, 32),
        False,  # fx mis-traces its skip connections: the ONNX-level fold takes over
    ),
    "monai-highresnet-3d": (
        lambda: nets.HighResNet(spatial_dims=3, in_channels=1, out_channels=2, norm_type="batch"),
        (1, 16, 16, 16),
        False,  # untraceable by fx, and the unoptimized ONNX export cannot run: see pipeline
    ),
    "efficientnet-pytorch-b0": (_efficientnet_pytorch, (3, 32, 32), True),
}


def with_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, *shape, generator=generator) * 2 + 0.5)
    return model.eval()


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_real_architectures_fold_exactly(name: str) -> None:
    build, shape, traceable = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = with_statistics(build(), shape)
    batch_norms = sum(isinstance(m, _BatchNorm) for m in model.modules())
    assert batch_norms > 0
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected = model(x).numpy()
    if not traceable:
        with pytest.raises(UntraceableError):
            fold_batch_norms(model, x)
        return
    result = fold_batch_norms(model, x)
    assert len(result.records) == batch_norms
    assert not any(isinstance(m, _BatchNorm) for m in result.module.modules())
    with torch.no_grad():
        actual = result.module(x).numpy()
    assert _relative(actual, expected) < 1e-5
    placements = Counter(record.placement for record in result.records)
    print(f"{name}: {batch_norms} BN, {dict(placements)}, rel {_relative(actual, expected):.2g}")


@pytest.mark.parametrize("name", ["monai-basicunet-2d", "monai-highresnet-3d"])
def test_an_untraceable_network_is_folded_in_onnx_instead(name: str) -> None:
    import onnxruntime as ort

    build, shape, _ = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = with_statistics(build(), shape)
    x = torch.randn(3, *shape)
    folded = fold_and_serialize(model, x)
    assert folded.fold_path == "onnx" and folded.note is not None
    assert [f.format for f in folded.files] == ["onnx"]
    batch_norms = sum(isinstance(m, _BatchNorm) for m in model.modules())
    if "optimizer" in folded.note:  # some BNs were folded by torch's exporter, not reported
        assert 0 < len(folded.records) <= batch_norms
    else:
        assert len(folded.records) == batch_norms
    session = ort.InferenceSession(folded.files[0].content, providers=["CPUExecutionProvider"])
    ops = {
        node.op_type
        for node in __import__("onnx").load_from_string(folded.files[0].content).graph.node
    }
    assert "BatchNormalization" not in ops
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert _relative(actual, expected) < 1e-5
