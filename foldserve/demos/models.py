"""The architectures foldserve trains, each a plain nn.Module with BatchNorm in the places that
test the folder: on the raw input, after Linear/Conv, after an activation, and inside a residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from foldserve.demos.data import DatasetName


@dataclass(frozen=True)
class Architecture:
    name: str
    dataset: DatasetName
    sample_shape: tuple[int, ...]  # per-sample input shape; the batch dimension is implied
    num_classes: int
    default_epochs: int
    build: Callable[[], nn.Module]
    summary: str
    max_batch_size: int | None = None  # the row cap; None: foldserve.pipeline.row_cap


class DigitsMLP(nn.Module):
    """64 raw pixels (0-16) -> BN on the input itself -> 2 x (Linear, BN, ReLU) -> 10 logits."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm1d(64)
        self.body = nn.Sequential(
            nn.Linear(64, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 64) -> (N, 10)
        logits: torch.Tensor = self.head(self.body(self.input_norm(x)))
        return logits


class ResidualBlock(nn.Module):
    """x + BN(Conv(ReLU(BN(Conv(x))))), then ReLU; the input is also the skip tap."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + residual)


class DigitsCNN(nn.Module):
    """(1, 8, 8) raw pixels -> input BN -> Conv/BN/ReLU -> Conv/ReLU/BN -> residual -> 10 logits."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm2d(1)
        # No padding here, so the input BN can fold into this conv exactly.
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, bias=False),  # (N, C, 6, 6)
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        # The BN after the activation cannot fold backwards: it tests the frozen-affine path.
        self.post_act = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(channels),
        )
        self.residual = ResidualBlock(channels)
        self.head = nn.Sequential(
            nn.MaxPool2d(2),  # (N, C, 3, 3)
            nn.Flatten(),
            nn.Linear(channels * 9, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, 10)
        x = self.stem(self.input_norm(x))  # (N, C, 6, 6)
        logits: torch.Tensor = self.head(self.residual(self.post_act(x)))
        return logits


class CancerMLP(nn.Module):
    """30 raw tumour measurements (scales from 1e-3 to 1e3) -> input BN -> 2 blocks -> 2 logits."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm1d(30)
        self.body = nn.Sequential(
            nn.Linear(30, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 30) -> (N, 2)
        logits: torch.Tensor = self.head(self.body(self.input_norm(x)))
        return logits


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        # NOTE: 512 rows of this MLP run in about 0.2 ms on one core; a run of 64 took 53 us in
        # the server, half of it the call's own cost. A cap of 64 ran each 64-row request alone
        # (issue 17), a cap of 512 lets a burst of them share one run.
        Architecture(
            "digits-mlp",
            "digits",
            (64,),
            10,
            30,
            DigitsMLP,
            "input BN, 2 x Linear/BN/ReLU",
            max_batch_size=512,
        ),
        Architecture(
            "digits-cnn",
            "digits",
            (1, 8, 8),
            10,
            30,
            DigitsCNN,
            "input BN, Conv/BN/ReLU, Conv/ReLU/BN, residual block",
        ),
        Architecture(
            "cancer-mlp", "breast_cancer", (30,), 2, 40, CancerMLP, "input BN, 2 x Linear/BN/ReLU"
        ),
    )
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown architecture {name!r}: choose one of {known}") from None
