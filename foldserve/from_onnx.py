"""``foldserve import MODEL.onnx``: an ONNX file from any exporter into a verified model version.

Check the graph (float32 inputs and outputs, any number of each, a dynamic batch) -> fold every
BatchNormalization at the ONNX level -> verify the folded graph against the original, both run in
ONNX Runtime -> store. Needs no torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from foldserve import calibration as calibration_data
from foldserve.calibration import CalibrationSource
from foldserve.input_statistics import (
    calibration_input_statistics,
    first_input,
    onnx_input_statistics,
)
from foldserve.onnx_fold import (
    dynamic_batch_problem,
    fold_onnx_batch_norms,
    make_batch_dynamic,
    re_export_advice,
)
from foldserve.pipeline import (
    FILENAMES,
    BuildResult,
    Folded,
    ModelCard,
    Task,
    check_row_cap,
    store_verified,
    task_for,
    timed,
)
from foldserve.tensors import Features, rows_per_step
from foldserve.verify_export import ExportedFile
from service.backends import Array
from service.errors import FoldingError
from service.packing import Packing, packing
from service.store import TensorDtype, TensorSpec, check_model_name, sha256_file


@dataclass(frozen=True)
class ImportResult:
    build: BuildResult
    batch_made_dynamic: bool  # the file had a fixed batch dimension, now symbolic

    @property
    def path(self) -> Path:
        return self.build.path


def import_onnx(
    path: str | Path,
    *,
    store: str | Path,
    name: str,
    labels: Sequence[str] | None = None,
    task: Task | None = None,
    calibration: CalibrationSource = None,
    input_shape: InputShape | None = None,
    seed: int = 0,
    command: str | None = None,
    max_batch_size: int | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    image_channels: str | None = None,
    image_layout: str | None = None,
) -> ImportResult:
    """Fold, verify and store the ONNX file at ``path`` as the next version of ``name``.

    ``max_batch_size``: the row cap written to the manifest (default: ``row_cap``)."""
    path = Path(path)
    check_model_name(name)
    check_row_cap(max_batch_size)
    seconds: dict[str, float] = {}
    try:
        original = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise FoldingError(f"{path}: not a readable ONNX file: {exc}") from exc
    inputs, output_names = _signature(original, input_shape)
    sides = packing(inputs)
    given = (image_mean, image_std, image_channels, image_layout)
    image = (
        None
        if all(value is None for value in given)
        else calibration_data.image_input_for(
            inputs, image_mean, image_std, image_channels, image_layout or "CHW"
        )
    )
    made_dynamic = False
    if (problem := dynamic_batch_problem(original)) is not None:
        original = make_batch_dynamic(original)  # raises with re-export advice if it cannot
        made_dynamic = True
    data = _calibration(calibration, inputs, seed)
    check_inputs = data.check_inputs()
    with timed(seconds, "reference"):
        results = _run(original, check_inputs, sides, output_names, made_dynamic)
    outputs = tuple(
        TensorSpec(name=name, shape=result.shape[1:])
        for name, result in zip(output_names, results, strict=True)
    )
    expected = packing(outputs).pack(results)
    chosen_task = task_for(results[0], labels or [], task)
    with timed(seconds, "fold"):
        result = fold_onnx_batch_norms(original)
    folded = Folded(
        files=[ExportedFile("onnx", FILENAMES["onnx"], result.model.SerializeToString())],
        records=result.records,
        fold_path="onnx",
        note=problem,
    )
    card = ModelCard(
        name=name,
        architecture=f"imported ONNX graph {original.graph.name or path.name!r}",
        task=chosen_task,
        sample_shape=sides.row_shape,
        labels=list(labels or []),
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        image=image,
    )
    provenance: dict[str, Any] = {
        "entry_point": "import",
        "source": f"{path} (sha256 {sha256_file(path)[:16]}, producer "
        f"{original.producer_name or '?'} {original.producer_version})".strip(),
        "bn_stats": "as_imported",
        "calibration": data.description,
        "calibration_samples": None if data.generated else len(data.samples),
        "seed": seed,
        "command": command or f"foldserve import {path} --name {name}",
        "dtype_conversion": _conversion(original),
    }
    build = store_verified(
        folded,
        card,
        check_inputs,
        expected,
        Path(store),
        provenance,
        seed=seed,
        seconds=seconds,
        # The graph's input BN, or (none: folded or decomposed by the exporter) the data's own.
        input_statistics=onnx_input_statistics(original, "as_imported", inputs[0].name)
        or (
            calibration_input_statistics(first_input(data, sides))
            if inputs[0].dtype in ("float32", "float16")  # ids and the like have no drift
            else None
        ),
    )
    return ImportResult(build, made_dynamic)


def _signature(
    model: onnx.ModelProto, input_shape: InputShape | None
) -> tuple[tuple[TensorSpec, ...], list[str]]:
    """Every data input with its dtype and per-sample shape (``input_shape``: one input's, or
    some inputs' by name, where the graph leaves them symbolic), and every output's name, in
    the graph's order."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs or not model.graph.output:
        raise FoldingError(
            f"the graph has {len(inputs)} data inputs and {len(model.graph.output)} outputs: "
            "a model needs at least one of each"
        )
    for value in (*inputs, *model.graph.output):
        elem_type = value.type.tensor_type.elem_type
        allowed = _INPUT_TYPES if value in inputs else _OUTPUT_TYPES
        if elem_type not in allowed:
            kinds = ", ".join(onnx.TensorProto.DataType.Name(t) for t in allowed)
            raise FoldingError(
                f"{value.name!r} is {onnx.TensorProto.DataType.Name(elem_type)}; foldserve takes "
                f"{'inputs' if value in inputs else 'outputs'} of {kinds}"
            )
    names = [value.name for value in inputs]
    if isinstance(input_shape, Mapping):
        unknown = sorted(set(input_shape) - set(names))
        if unknown:
            raise FoldingError(f"--input-shape names {unknown}: the graph's inputs are {names}")
        shapes = {name: input_shape.get(name) for name in names}
    elif input_shape is not None and len(inputs) > 1:
        raise FoldingError(
            f"--input-shape gives one input's shape, but the graph has {len(inputs)} inputs "
            f"{names}: give each one's by name (--input-shape {names[0]}=...)"
        )
    else:
        shapes = {names[0]: input_shape}
    specs = tuple(
        TensorSpec(
            name=value.name,
            dtype=_INPUT_TYPES[value.type.tensor_type.elem_type],
            shape=_sample_shape(value, shapes.get(value.name)),
        )
        for value in inputs
    )
    return specs, [value.name for value in model.graph.output]


# One input's sample shape, or some inputs' by name.
InputShape = Sequence[int] | Mapping[str, Sequence[int]]
# The graph's element types foldserve serves: inputs as they are (requests are cast to them);
# outputs answered as float32.
_INPUT_TYPES: dict[int, TensorDtype] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}
_OUTPUT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float32"}


def _conversion(model: onnx.ModelProto) -> str | None:
    """What the server converts: float16 outputs are answered as float32 (FP32)."""
    half = [
        value.name
        for value in model.graph.output
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    ]
    if not half:
        return None
    return f"outputs {', '.join(half)}: float16 -> float32 (answered FP32, values exact)"


def _sample_shape(value: onnx.ValueInfoProto, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    dims = value.type.tensor_type.shape.dim
    fixed = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:])
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != len(fixed) or any(f and f != s for f, s in zip(fixed, shape, strict=True)):
            raise FoldingError(f"--input-shape {shape} does not fit the graph's input {fixed}")
    elif not dims or 0 in fixed:
        raise FoldingError(
            f"input {value.name!r} has symbolic or unknown sample dims {fixed}: "
            "give one sample's shape with --input-shape"
        )
    else:
        shape = fixed
    if not shape or math.prod(shape) < 1:
        raise FoldingError(f"input {value.name!r} has no per-sample dims")
    return shape


def _calibration(
    given: CalibrationSource, inputs: tuple[TensorSpec, ...], seed: int
) -> calibration_data.Calibration:
    """The samples to check on, their inputs side by side when there are several."""
    if given is None:
        return calibration_data.generated_inputs(inputs, seed)
    if callable(given) and not isinstance(given, calibration_data.Calibration):
        return _typed(given(inputs), inputs)  # the CLI's: it loads what it was told to
    if len(inputs) == 1:
        return _typed(calibration_data.resolve(given, inputs[0].shape, seed), inputs)
    if isinstance(given, str | Path):
        return calibration_data.load_inputs(Path(given), inputs)
    if isinstance(given, calibration_data.Calibration):
        return given  # made by the caller, its rows side by side
    raise FoldingError(
        f"the graph has {len(inputs)} inputs {[spec.name for spec in inputs]}: give calibration "
        "data as an .npz file with one array per input, named as the input"
    )


def _typed(
    data: calibration_data.Calibration, inputs: tuple[TensorSpec, ...]
) -> calibration_data.Calibration:
    """The data fed as the model's rows are typed (an int64 input's data as int64)."""
    return dataclasses.replace(data, dtype=str(packing(inputs).dtype))


def _run(
    model: onnx.ModelProto,
    inputs: Features,
    sides: Packing,
    output_names: list[str],
    made_dynamic: bool = False,
) -> list[Array]:
    """The original graph's outputs in ONNX Runtime on the CPU: the reference to verify against.

    ``made_dynamic``: the file's fixed batch was replaced by a symbolic one, so a failure on a
    batch of several samples means the batch is baked in somewhere else (an Expand or a Concat
    to batch 1): refused as that, with the exporter's advice.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # the refusal below says it; no red line of its own on stderr
    options.enable_cpu_mem_arena = False  # a one-off run: no batch's memory kept for the next
    # NOTE: in steps (of 2 samples at least: a baked batch shows as a failure): 16 images of
    # 3x224x224 at once took a ResNet-50 import to 2.4 GiB of RSS.
    step = max(2, rows_per_step(tuple(inputs.shape[1:])))
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        parts = [
            session.run(
                output_names,
                dict(zip(sides.names, sides.unpack(inputs[i : i + step]), strict=True)),
            )
            for i in range(0, len(inputs), step)
        ]
        results = [np.concatenate([part[k] for part in parts]) for k in range(len(output_names))]
    except Exception as exc:  # onnxruntime raises its own untyped errors
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if made_dynamic:
            raise FoldingError(
                f"the graph hard-codes its batch size past its inputs: ONNX Runtime cannot run "
                f"it on {len(inputs)} samples at once ({first_line}); "
                f"{re_export_advice(model)}"
            ) from exc
        raise FoldingError(f"ONNX Runtime cannot run the original graph: {first_line}") from exc
    outputs = [np.asarray(result, dtype=np.float32) for result in results]
    for name, output in zip(output_names, outputs, strict=True):
        if output.ndim == 0 or len(output) != len(inputs):
            raise FoldingError(
                f"the graph answers {len(inputs)} samples with an output {name!r} of shape "
                f"{list(output.shape)}: it hard-codes its batch size; {re_export_advice(model)}"
            )
    return outputs
