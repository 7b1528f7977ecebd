"""``foldserve train``: train a demo, freeze its statistics, then the shared pipeline stores it."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from foldserve.demos.data import Dataset, load_dataset
from foldserve.demos.models import Architecture, get_architecture
from foldserve.demos.train import TrainConfig, accuracy, train
from foldserve.pipeline import BuildResult, ModelCard, build_version, timed
from foldserve.stats import set_population_statistics
from foldserve.tensors import predict
from service.store import Manifest


@dataclass(frozen=True)
class Accuracies:
    ema: float  # held-out accuracy, eval mode with PyTorch's running estimates
    population: float  # the same with population statistics
    exported_stats: float  # the unfolded eval-mode model with the statistics being exported
    onnx: float  # the exported ONNX file itself


@dataclass(frozen=True)
class PipelineResult:
    build: BuildResult
    accuracies: Accuracies

    @property
    def path(self) -> Path:
        return self.build.path

    @property
    def manifest(self) -> Manifest:
        return self.build.manifest

    @property
    def seconds(self) -> dict[str, float]:
        return self.build.seconds


def reproduce_command(config: TrainConfig, store: Path) -> str:
    return (
        f"foldserve train {config.arch} --store {store} --seed {config.seed} "
        f"--epochs {config.epochs} --bn-stats {config.bn_stats}"
    )


def run(config: TrainConfig, store: Path, *, progress: bool = True) -> PipelineResult:
    """Build one demo version in ``store``; raises (and stores nothing) if any check fails."""
    arch = get_architecture(config.arch)
    data = load_dataset(arch.dataset, arch.sample_shape)
    # NOTE: one thread makes the float reductions, hence the trained weights, the same on every
    # machine for a given seed; these models are too small to gain from more threads anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, arch, data, store, progress)
    finally:
        torch.set_num_threads(threads)


def _run(
    config: TrainConfig, arch: Architecture, data: Dataset, store: Path, progress: bool
) -> PipelineResult:
    seconds: dict[str, float] = {}
    with timed(seconds, "train"):
        trained = train(config, arch, data, progress=progress)

    # Two frozen versions of the same weights: EMA estimates as trained, and population stats.
    with timed(seconds, "statistics"):
        ema_model = copy.deepcopy(trained).eval()
        population_model = copy.deepcopy(trained)
        shifts = set_population_statistics(population_model, data.x_train)
    chosen = population_model if config.bn_stats == "population" else ema_model

    card = ModelCard(
        name=arch.name,
        architecture=f"{arch.name}: {arch.summary}",
        task="classification",
        sample_shape=arch.sample_shape,
        labels=list(data.labels),
        max_batch_size=arch.max_batch_size,
    )
    # The reference is the unfolded model with the statistics being exported, in eval mode.
    expected = predict(chosen, data.x_test)
    accuracies = Accuracies(
        ema=accuracy(ema_model, data.x_test, data.y_test),
        population=accuracy(population_model, data.x_test, data.y_test),
        exported_stats=float((expected.argmax(axis=1) == data.y_test).mean()),
        onnx=float("nan"),  # known once the file is verified, below
    )
    provenance = {
        "entry_point": "train",
        "source": f"foldserve.demos.models: {arch.name}",
        "dataset": data.source,
        "split": data.split,
        "seed": config.seed,
        "epochs": config.epochs,
        "bn_stats": config.bn_stats,
        "calibration": f"{data.source}, training part ({len(data.x_train)} samples)",
        "calibration_samples": len(data.x_train),
        "train_config": dataclasses.asdict(config),
        "accuracy_ema": accuracies.ema,
        "accuracy_population": accuracies.population,
        "accuracy_unfolded_exported_stats": accuracies.exported_stats,
        "torch_version": torch.__version__,
        "command": reproduce_command(config, store),
    }
    build = build_version(
        chosen,
        card,
        data.x_test,
        expected,
        store,
        provenance,
        stats_shifts=shifts if config.bn_stats == "population" else None,
        seed=config.seed,
        seconds=seconds,
    )
    onnx_outputs = build.verified.outputs["onnx"]
    accuracies = dataclasses.replace(
        accuracies, onnx=float((onnx_outputs.argmax(axis=1) == data.y_test).mean())
    )
    return PipelineResult(build, accuracies)
