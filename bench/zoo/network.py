"""One row of the zoo: a network spec (``MODULE:FACTORY``, its arguments, one sample's shape),
the input sizes the rows use, and MONAI rows for 2-D and 3-D at once."""

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
