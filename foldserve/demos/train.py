"""Train one architecture from scratch: Adam on cross-entropy, deterministic for a given seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from foldserve.demos.data import Dataset, Targets
from foldserve.demos.models import Architecture
from foldserve.tensors import Features, predict

BatchNormStats = Literal["ema", "population"]


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    seed: int = 0
    epochs: int = 30
    bn_stats: BatchNormStats = "population"
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4


def train(
    config: TrainConfig, arch: Architecture, data: Dataset, *, progress: bool = True
) -> nn.Module:
    """Return the trained model in eval mode, its BNs holding PyTorch's running (EMA) estimates."""
    # NOTE: fork_rng keeps the caller's global RNG untouched; everything random below (weight
    # init, shuffling) derives from config.seed, so a rerun gives the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = arch.build()
        shuffler = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        x = torch.from_numpy(data.x_train)
        y = torch.from_numpy(data.y_train)
        steps_per_epoch = len(x) // config.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"batch size {config.batch_size} exceeds the {len(x)} samples")
        # Cosine decay to zero: the last epochs take small steps, so the final weights (and the
        # statistics frozen under them) do not depend on where a large step happened to land.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs * steps_per_epoch
        )
        bar = tqdm(range(config.epochs), desc=f"train {arch.name}", disable=not progress)
        for _epoch in bar:
            loss = _train_epoch(model, optimizer, schedule, x, y, config.batch_size, shuffler)
            bar.set_postfix(loss=f"{loss:.4f}")
    return model.eval()


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffler: torch.Generator,
) -> float:
    model.train()
    order = torch.randperm(len(x), generator=shuffler)
    # NOTE: the last partial batch is dropped: a BN batch of one sample has no variance, and a
    # tiny one gives noisy statistics. The order changes every epoch, so every sample is seen.
    steps = len(x) // batch_size
    total = 0.0
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        total += loss.item()
    return total / max(steps, 1)


def accuracy(model: nn.Module, x: Features, y: Targets) -> float:
    return float((predict(model, x).argmax(axis=1) == y).mean())
