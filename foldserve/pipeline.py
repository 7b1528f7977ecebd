"""train -> freeze statistics -> fold -> export -> verify -> store: one function, top to bottom."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from foldserve.demos.data import Dataset, load_dataset
from foldserve.demos.models import Architecture, get_architecture
from foldserve.demos.train import TrainConfig, accuracy, train
from foldserve.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx,
    export_torchscript,
    onnx_opset,
)
from foldserve.fold import FoldResult, fold_batch_norms
from foldserve.stats import set_population_statistics
from foldserve.verify_export import ExportedFile, VerifiedExport, verify_exports
from service.store import (
    Golden,
    Manifest,
    ModelFile,
    ModelFormat,
    Provenance,
    TensorSpec,
    read_manifest,
    write_version,
)

GOLDEN_SAMPLES = 8
FILENAMES: dict[ModelFormat, str] = {"onnx": "model.onnx", "torchscript": "model.ts"}


@dataclass(frozen=True)
class Accuracies:
    ema: float  # held-out accuracy, eval mode with PyTorch's running estimates
    population: float  # the same with population statistics
    exported_stats: float  # the unfolded eval-mode model with the statistics being exported
    onnx: float  # the exported ONNX file itself


@dataclass(frozen=True)
class PipelineResult:
    path: Path  # the new version's folder
    manifest: Manifest
    accuracies: Accuracies
    fold: FoldResult
    seconds: dict[str, float]  # wall time per step: train, statistics, fold, export, verify


def reproduce_command(config: TrainConfig, store: Path) -> str:
    return (
        f"foldserve train {config.arch} --store {store} --seed {config.seed} "
        f"--epochs {config.epochs} --bn-stats {config.bn_stats}"
    )


def run(config: TrainConfig, store: Path, *, progress: bool = True) -> PipelineResult:
    """Build one model version in ``store``; raises (and stores nothing) if any check fails."""
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
    with _timed(seconds, "train"):
        trained = train(config, arch, data, progress=progress)

    # Two frozen versions of the same weights: EMA estimates as trained, and population stats.
    with _timed(seconds, "statistics"):
        ema_model = copy.deepcopy(trained).eval()
        population_model = copy.deepcopy(trained)
        set_population_statistics(population_model, data.x_train)
    chosen = population_model if config.bn_stats == "population" else ema_model

    example = torch.from_numpy(data.x_train[:8])  # (8, *sample_shape); the exporter needs >= 2
    with _timed(seconds, "fold"):
        fold = fold_batch_norms(chosen, example)
    with _timed(seconds, "export"):
        onnx_bytes = export_onnx(fold.module, example)
        torchscript_bytes = export_torchscript(fold.module, example)
    exports = [
        ExportedFile("onnx", FILENAMES["onnx"], onnx_bytes),
        ExportedFile("torchscript", FILENAMES["torchscript"], torchscript_bytes),
    ]
    # The reference is the unfolded model with the statistics being exported, in eval mode.
    with _timed(seconds, "verify"):
        verified = verify_exports(exports, chosen, data.x_test, seed=config.seed)

    accuracies = Accuracies(
        ema=accuracy(ema_model, data.x_test, data.y_test),
        population=accuracy(population_model, data.x_test, data.y_test),
        exported_stats=accuracy(chosen, data.x_test, data.y_test),
        onnx=float((verified.outputs["onnx"].argmax(axis=1) == data.y_test).mean()),
    )
    contents = {export.filename: export.content for export in exports}

    def make_manifest(version: int, digests: dict[str, str]) -> Manifest:
        return _manifest(
            config, arch, data, store, version, digests, contents, fold, verified, accuracies
        )

    path = write_version(store, arch.name, contents, make_manifest)
    return PipelineResult(path, read_manifest(path), accuracies, fold, seconds)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start


def _manifest(
    config: TrainConfig,
    arch: Architecture,
    data: Dataset,
    store: Path,
    version: int,
    digests: dict[str, str],
    contents: dict[str, bytes],
    fold: FoldResult,
    verified: VerifiedExport,
    accuracies: Accuracies,
) -> Manifest:
    golden_inputs = data.x_test[:GOLDEN_SAMPLES]
    golden_outputs = verified.outputs["onnx"][:GOLDEN_SAMPLES]
    return Manifest(
        name=arch.name,
        version=version,
        architecture=f"{arch.name}: {arch.summary}",
        task="classification",
        inputs=(TensorSpec(name=INPUT_NAME, shape=arch.sample_shape),),
        outputs=(TensorSpec(name=OUTPUT_NAME, shape=(arch.num_classes,)),),
        labels=list(data.labels),
        files=tuple(
            ModelFile(
                format=fmt,
                path=filename,
                sha256=digests[filename],
                size_bytes=len(contents[filename]),
            )
            for fmt, filename in FILENAMES.items()
        ),
        batch_norm=fold.records,
        verification=verified.verification,
        provenance=Provenance(
            dataset=data.source,
            split=data.split,
            seed=config.seed,
            epochs=config.epochs,
            bn_stats=config.bn_stats,
            train_config=dataclasses.asdict(config),
            accuracy_ema=accuracies.ema,
            accuracy_population=accuracies.population,
            accuracy_unfolded_exported_stats=accuracies.exported_stats,
            torch_version=torch.__version__,
            onnx_opset=onnx_opset(contents[FILENAMES["onnx"]]),
            command=reproduce_command(config, store),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        ),
        golden=Golden(
            inputs=_rows(golden_inputs),
            outputs=_rows(golden_outputs),
        ),
    )


def _rows(array: np.ndarray) -> list[list[float]]:
    """(N, ...) -> N flat lists of Python floats (float32 values are exact in float64/JSON)."""
    return [[float(v) for v in row] for row in array.reshape(len(array), -1)]
