"""Tiny real artifacts shared by the trainer tests: few epochs, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from foldserve.demos.build import PipelineResult, run
from foldserve.demos.data import Dataset, load_dataset
from foldserve.demos.models import get_architecture
from foldserve.demos.train import TrainConfig, train

TINY_EPOCHS = 2


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    # Small models; one thread keeps runs fast on a shared 2-core box and results reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_flat() -> Dataset:
    return load_dataset("digits", (64,))


@pytest.fixture(scope="session")
def digits_images() -> Dataset:
    return load_dataset("digits", (1, 8, 8))


def _trained(name: str, data: Dataset) -> nn.Module:
    config = TrainConfig(arch=name, epochs=TINY_EPOCHS)
    return train(config, get_architecture(name), data, progress=False)


@pytest.fixture(scope="session")
def trained_mlp(digits_flat: Dataset) -> nn.Module:
    """A digits-mlp after a few epochs, eval mode, EMA statistics; copy it before editing."""
    return _trained("digits-mlp", digits_flat)


@pytest.fixture(scope="session")
def trained_cnn(digits_images: Dataset) -> nn.Module:
    return _trained("digits-cnn", digits_images)


@pytest.fixture(scope="session")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def stored_twice(store_root: Path) -> tuple[PipelineResult, PipelineResult]:
    """Two versions of digits-mlp written by the pipeline into one store (population stats)."""
    config = TrainConfig(arch="digits-mlp", epochs=TINY_EPOCHS)
    first = run(config, store_root, progress=False)
    second = run(config, store_root, progress=False)
    return first, second
