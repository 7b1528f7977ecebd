"""Which networks the zoo builds, with which arguments, at which input size.

Every entry is data: a ``MODULE:FACTORY`` spec (the form ``foldserve export --model`` takes), its
keyword arguments and one sample's shape, so the JSON can say exactly what was built. Networks are
randomly initialized (``pretrained=False`` wherever the factory has the argument: nothing is ever
downloaded) and kept small where the architecture is configurable (widths, depth), never where it
is not (ResNet-200 stays ResNet-200).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

Task = Literal[
    "classification", "segmentation", "registration", "regression", "reconstruction", "generation"
]
MONAI = "monai.networks.nets"

# One sample's shape per spatial dims: small, but real medical-imaging shapes.
IMAGE = {2: (3, 64, 64), 3: (1, 32, 32, 32)}  # classifiers: RGB 2-D, single-channel volumes
SCAN = {2: (1, 64, 64), 3: (1, 32, 32, 32)}  # segmentation and reconstruction
PAIR = {2: (2, 64, 64), 3: (2, 32, 32, 32)}  # registration: moving and fixed image stacked
CLASSES = 5
LABELS = 2


@dataclass(frozen=True)
class Network:
    name: str  # the row's name, unique: network and spatial dims
    factory: str  # MODULE:FACTORY, as `foldserve export --model` takes it
    kwargs: Mapping[str, Any]
    input_shape: tuple[int, ...]  # one sample
    task: Task
    spatial_dims: int
    covers: tuple[str, ...] = field(default=())  # monai.networks.nets names this row stands for
    stats_batch: int = 4  # samples per train-mode pass that sets the BN statistics

    def build(self) -> nn.Module:
        from foldserve.from_module import load_module

        return load_module(self.factory, dict(self.kwargs))


def monai_rows(
    factory: str,
    task: Task,
    kwargs: Callable[[int], dict[str, Any]],
    *,
    dims: tuple[int, ...] = (2, 3),
    shape: Mapping[int, tuple[int, ...]] | None = None,
    name: str | None = None,
    stats_batch: int = 4,
) -> list[Network]:
    shapes = shape or (IMAGE if task == "classification" else SCAN)
    return [
        Network(
            name=f"{name or factory}-{d}d",
            factory=f"{MONAI}:{factory}",
            kwargs=kwargs(d),
            input_shape=shapes[d],
            task=task,
            spatial_dims=d,
            covers=(factory,),
            stats_batch=stats_batch,
        )
        for d in dims
    ]


def catalogue() -> list[Network]:
    """Every row of the report, in report order."""
    from bench.zoo import segmentation

    return [*classifiers(), *segmentation.networks(), *efficientnet_pytorch()]


def classifiers() -> list[Network]:
    rows: list[Network] = []
    for depth in (10, 18, 34, 50, 101, 152, 200):
        # NOTE: conv1_t_stride=2 is the usual stem (torchvision's, MedicalNet's); monai's default
        # stride 1 runs the whole first stage at full resolution.
        rows += monai_rows(
            f"resnet{depth}",
            "classification",
            lambda d: {
                "spatial_dims": d,
                "n_input_channels": IMAGE[d][0],
                "num_classes": CLASSES,
                "conv1_t_stride": 2,
                "pretrained": False,
            },
        )
    for densenet in ("DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264"):
        rows += monai_rows(densenet, "classification", _dense_or_se("out_channels"))
    for senet in (
        "SEResNet50",
        "SEResNet101",
        "SEResNet152",
        "SEResNeXt50",
        "SEResNeXt101",
        "SENet154",
    ):
        rows += monai_rows(senet, "classification", _dense_or_se("num_classes"))
    rows += monai_rows(
        "EfficientNetBN",
        "classification",
        lambda d: {
            "model_name": "efficientnet-b0",
            "pretrained": False,
            "spatial_dims": d,
            "in_channels": IMAGE[d][0],
            "num_classes": CLASSES,
        },
        name="EfficientNetBN-b0",
    )
    small = {"channels": (8, 16, 32), "strides": (2, 2, 2), "norm": "batch"}
    rows += monai_rows(
        "Classifier",
        "classification",
        lambda d: {"in_shape": IMAGE[d], "classes": CLASSES, **small},
    )
    rows += monai_rows("Discriminator", "classification", lambda d: {"in_shape": IMAGE[d], **small})
    rows += monai_rows("Critic", "classification", lambda d: {"in_shape": IMAGE[d], **small})
    rows += monai_rows(
        "Regressor",
        "regression",
        lambda d: {"in_shape": SCAN[d], "out_shape": (3,), **small},
    )
    return rows


def _dense_or_se(classes_argument: str) -> Callable[[int], dict[str, Any]]:
    def kwargs(d: int) -> dict[str, Any]:
        return {
            "spatial_dims": d,
            "in_channels": IMAGE[d][0],
            classes_argument: CLASSES,
            "pretrained": False,
        }

    return kwargs


def efficientnet_pytorch() -> list[Network]:
    """efficientnet-pytorch's EfficientNet (the lukemelas original), b0 to b7, 2-D only."""
    return [
        Network(
            name=f"efficientnet-pytorch-b{i}",
            factory="efficientnet_pytorch:EfficientNet.from_name",
            kwargs={
                "model_name": f"efficientnet-b{i}",
                "num_classes": CLASSES,
                "image_size": IMAGE[2][1],
            },
            input_shape=IMAGE[2],
            task="classification",
            spatial_dims=2,
        )
        for i in range(8)
    ]
