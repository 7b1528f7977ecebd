"""Which networks the zoo builds, with which arguments, at which input size.

Every entry is data: a ``MODULE:FACTORY`` spec (the form ``foldserve export --model`` takes), its
keyword arguments and one sample's shape, so the JSON can say exactly what was built. Networks are
randomly initialized (``pretrained=False`` wherever the factory has the argument: nothing is ever
downloaded) and kept small where the architecture is configurable (widths, depth), never where it
is not (ResNet-200 stays ResNet-200).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.zoo import segmentation
from bench.zoo.network import CLASSES, IMAGE, SCAN, Network, monai_rows


def catalogue() -> list[Network]:
    """Every row of the report, in report order."""
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
    # The size users export most: a ResNet-50 on one 224x224 RGB image (the ImageNet shape).
    rows += monai_rows(
        "resnet50",
        "classification",
        lambda d: {
            "spatial_dims": d,
            "n_input_channels": 3,
            "num_classes": 1000,
            "conv1_t_stride": 2,
            "pretrained": False,
        },
        dims=(2,),
        shape={2: (3, 224, 224)},
        name="resnet50-224",
        stats_batch=2,
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
