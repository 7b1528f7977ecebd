"""``foldserve export``: your own ``nn.Module`` (and checkpoint) into a verified model version.

    import foldserve
    foldserve.export(model, (3, 64, 64), store="model_store", name="my-net",
                     calibration="train.npy", bn_stats="population")

Freeze statistics (running estimates, or population statistics over your data) -> convert to
float32 -> the shared pipeline (fold, export, verify, store).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from foldserve import calibration as calibration_data
from foldserve.calibration import CalibrationSource
from foldserve.convert import to_float32
from foldserve.input_statistics import calibration_input_statistics, first_input
from foldserve.pipeline import (
    BuildResult,
    ModelCard,
    Task,
    build_version,
    check_row_cap,
    task_for,
    timed,
)
from foldserve.several import Named, Outputs, Packed, model_outputs
from foldserve.stats import set_population_statistics
from foldserve.tensors import INPUT_NAME, OUTPUT_NAME, predict, rows_per_step
from service.errors import FoldingError
from service.packing import Signature, packing
from service.store import ImageInput, StatsShift, TensorSpec, check_model_name

BatchNormStats = Literal["ema", "population"]
# One sample's shape, or each input's by name (in the order forward takes them).
InputShape = Sequence[int] | Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class ExportResult:
    build: BuildResult
    stats_shifts: dict[str, StatsShift]  # per BN, population vs running (population only)
    calibration: str  # where the statistics and checks came from

    @property
    def path(self) -> Path:
        return self.build.path


def export(
    model: nn.Module,
    input_shape: InputShape,
    *,
    store: str | Path,
    name: str,
    labels: Sequence[str] | None = None,
    task: Task | None = None,
    bn_stats: BatchNormStats | None = None,
    calibration: CalibrationSource = None,
    seed: int = 0,
    progress: bool = False,
    command: str | None = None,
    source: str | None = None,
    max_batch_size: int | None = None,
    output_names: Sequence[str] | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    image_channels: str | None = None,
    image_layout: str | None = None,
) -> ExportResult:
    """Fold, export, verify and store ``model`` as the next version of ``name`` in ``store``.

    ``input_shape`` is one sample's shape, any rank (features, C,H,W images, C,D,H,W volumes),
    or for a forward of several tensors each one's, by name, in the order forward takes them
    (``{"image": (3, 224, 224), "meta": (5,)}``). forward may return a tensor, or a tuple, list,
    dict or dataclass of tensors (``foldserve.several`` names them); with several, calibration
    data is an ``.npz`` file with one array per input, named as the input.
    ``bn_stats``: "ema" keeps the module's running estimates; "population" recomputes them over
    ``calibration`` (an array, a .npy/.npz file or a folder of images). Default: population
    when calibration data is given, ema otherwise. Without data the checks run on generated
    inputs. ``max_batch_size``: the row cap written to the manifest (default: ``row_cap``).
    Raises ``FoldserveError`` (nothing stored) when a step refuses the model.
    """
    was_training = model.training  # put back at the end: the export runs it in eval mode
    inputs = _input_specs(input_shape)
    sides = packing(inputs)
    image = _image(inputs, image_mean, image_std, image_channels, image_layout)  # refused early
    shape = sides.row_shape
    check_model_name(name)
    check_row_cap(max_batch_size)
    data = _calibration(calibration, inputs, seed)
    stats: BatchNormStats = bn_stats or ("ema" if data.generated else "population")
    if stats == "population" and data.generated:
        raise FoldingError(
            "population statistics need calibration data (an array, .npy/.npz or image folder)"
        )
    _refuse_untracked_statistics(model)
    seconds: dict[str, float] = {}
    check_inputs = data.check_inputs()
    # Labels, task and outputs checked on two samples: before the statistics, fold and checks.
    found = _outputs(model, inputs, check_inputs[:2], output_names)
    # One tensor in and one bare tensor out: exported as always; anything else through the
    # wrappers (foldserve.several), so that a list of one tensor, say, is served as that tensor.
    several = not (sides.single and found.keys == ((),))
    output_name = output_names[0] if output_names and not several else OUTPUT_NAME
    outputs = found.specs if several else (found.specs[0].model_copy(update={"name": output_name}),)
    signature = Signature(sides, packing(outputs))
    named = Named(model, len(inputs), found.keys)
    runner = Packed(named, signature) if several else model  # rows in, rows out
    # NOTE: a copy only where the export writes into the model (population statistics; a
    # conversion copies by itself): a second copy of a ResNet-50's weights took its export past
    # 2 GiB of RSS. The model is put in eval mode for the export, and back as it was after.
    try:
        with timed(seconds, "convert"):
            private = copy.deepcopy(runner) if stats == "population" else runner
            converted = to_float32(private, check_inputs)
        frozen = converted.model
        first_output = signature.outputs.part(predict(frozen, check_inputs[:2]), 0)
        chosen_task = task_for(first_output, labels or [], task)
        shifts: dict[str, StatsShift] = {}
        if stats == "population":
            with timed(seconds, "statistics"):
                step = rows_per_step(shape)
                shifts = set_population_statistics(frozen, data.samples, step, progress=progress)
                if several:  # named as in the model itself, not in its wrapper
                    shifts = {k.removeprefix(Packed.PREFIX): v for k, v in shifts.items()}
        with timed(seconds, "reference"):
            expected = predict(frozen, check_inputs, rows_per_step(shape))
        card = ModelCard(
            name=name,
            architecture=f"{type(model).__module__}.{type(model).__qualname__}",
            task=chosen_task,
            sample_shape=shape,
            labels=list(labels or []),
            max_batch_size=max_batch_size,
            output_name=output_name,
            inputs=inputs if several else (),
            outputs=outputs if several else (),
            image=image,
        )
        provenance: dict[str, Any] = {
            "entry_point": "export",
            "source": source or f"{type(model).__module__}.{type(model).__qualname__} (in memory)",
            "bn_stats": stats,
            "calibration": data.description,
            "calibration_samples": None if data.generated else len(data.samples),
            "dtype_conversion": converted.conversion,
            "seed": seed,
            "torch_version": torch.__version__,
            "command": command or f"foldserve.export(..., name={name!r}, bn_stats={stats!r})",
        }
        build = build_version(
            frozen.named if isinstance(frozen, Packed) else frozen,
            card,
            check_inputs,
            expected,
            Path(store),
            provenance,
            stats_shifts=shifts,
            seed=seed,
            seconds=seconds,
            data_statistics=calibration_input_statistics(first_input(data, sides)),
        )
        return ExportResult(build, shifts, data.description)
    finally:
        model.train(was_training)


def load_module(
    spec: str, kwargs: dict[str, Any] | None = None, checkpoint: Path | None = None
) -> nn.Module:
    """``MODULE:FACTORY`` (a dotted module or a ``.py`` path) called with ``kwargs``, then the
    checkpoint's state_dict loaded strictly, or the checkpoint itself when it holds a module."""
    factory = _factory(spec)
    try:
        model = factory(**(kwargs or {}))
    except TypeError as exc:
        raise FoldingError(f"{spec}(**{json.dumps(kwargs or {})}) failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise FoldingError(f"{spec} returned {type(model).__name__}, not a torch nn.Module")
    if checkpoint is not None:
        model = _load_checkpoint(model, checkpoint)
    return model


def _factory(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise FoldingError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. mypkg.nets:build")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or loader.loader is None:
                raise FoldingError(f"cannot load {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            # Modules beside the user's working directory, as `python -m` would find them.
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as exc:
        raise FoldingError(f"cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise FoldingError(f"{module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise FoldingError(f"{spec} is not callable")
    return target


def _load_checkpoint(model: nn.Module, path: Path) -> nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise FoldingError(f"checkpoint {path} does not exist") from exc
    except Exception:
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, nn.Module):
        return state
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise FoldingError(f"checkpoint {path} does not fit the model: {exc}") from exc
        return model
    raise FoldingError(f"checkpoint {path} holds {type(state).__name__}, not a state_dict")


def _sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise FoldingError(
            f"input shape {input_shape!r}: give one sample's positive dims, e.g. 3,64,64"
        )
    if math.prod(shape) > 1 << 26:
        raise FoldingError(f"input shape {shape} holds over 2^26 numbers per sample")
    return shape


def _refuse_untracked_statistics(model: nn.Module) -> None:
    untracked = [
        name
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and not module.track_running_stats
    ]
    if untracked:
        raise FoldingError(
            f"BatchNorm {', '.join(untracked[:5])} keep no running statistics "
            "(track_running_stats=False): they normalize with batch statistics at serving time; "
            "rebuild them with track_running_stats=True and export with --bn-stats population"
        )


def _input_specs(
    input_shape: InputShape,
) -> tuple[TensorSpec, ...]:
    if isinstance(input_shape, Mapping):
        if not input_shape:
            raise FoldingError("input shapes: give at least one input's")
        return tuple(
            TensorSpec(name=str(name), shape=_sample_shape(dims))
            for name, dims in input_shape.items()
        )
    return (TensorSpec(name=INPUT_NAME, shape=_sample_shape(input_shape)),)


def _calibration(
    given: CalibrationSource, inputs: tuple[TensorSpec, ...], seed: int
) -> calibration_data.Calibration:
    """The samples to calibrate and check on, each sample's inputs side by side."""
    if len(inputs) == 1:
        return calibration_data.resolve(given, inputs[0].shape, seed)
    if given is None:
        return calibration_data.generated(packing(inputs).row_shape, seed)
    if isinstance(given, calibration_data.Calibration):
        return given
    if isinstance(given, str | Path):
        return calibration_data.load_inputs(Path(given), inputs)
    raise FoldingError(
        f"the model takes {len(inputs)} inputs {[spec.name for spec in inputs]}: give "
        "calibration data as an .npz file with one array per input, named as the input"
    )


def _image(
    inputs: tuple[TensorSpec, ...],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: str | None,
    layout: str | None,
) -> ImageInput | None:
    """How an image becomes the first input, when any of its preprocessing was given."""
    if mean is None and std is None and channels is None and layout is None:
        return None
    return calibration_data.image_input_for(inputs, mean, std, channels, layout or "CHW")


def _outputs(
    model: nn.Module,
    inputs: tuple[TensorSpec, ...],
    rows: np.ndarray,
    names: Sequence[str] | None,
) -> Outputs:
    """The outputs as one run shows them, renamed by ``names`` when given."""
    try:
        return model_outputs(model, packing(inputs), rows, names)
    except TypeError as exc:  # forward takes other arguments than the shapes given
        raise FoldingError(
            f"the model's forward does not take the {len(inputs)} input(s) given "
            f"({', '.join(spec.name for spec in inputs)}): {exc}; give each input's shape, by "
            "name, in the order forward takes them"
        ) from exc
