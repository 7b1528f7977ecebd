"""The one path every entry point ends in: fold -> serialize -> verify -> store.

``foldserve train`` (a demo), ``foldserve export`` (your module) and ``foldserve import`` (an ONNX
file) each make a frozen model and the inputs to check it on, then call ``build_version`` (torch
modules) or ``store_verified`` (ONNX files already folded). Nothing is stored unless every check
passes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from foldserve.tensors import INPUT_NAME, OUTPUT_NAME, Features
from foldserve.verify_export import RTOL, ExportedFile, VerifiedExport, verify_exports
from service.backends import Array
from service.errors import FoldingError, VerificationError
from service.packing import Signature, packing
from service.store import (
    BatchingConfig,
    BatchNormRecord,
    FoldPath,
    Golden,
    ImageInput,
    InputStatistics,
    Manifest,
    ModelFile,
    Provenance,
    StatsShift,
    TensorSpec,
    read_manifest,
    write_version,
)

if TYPE_CHECKING:
    from torch import nn

    from foldserve.fold import Examples
    from foldserve.input_statistics import HiddenMonitor

# NOTE: torch is imported inside the functions that fold modules: `foldserve import` (ONNX files)
# runs this module without torch.
Task = Literal["classification", "regression", "segmentation"]
FILENAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}
GOLDEN_SAMPLES = 8
# NOTE: golden samples live in the manifest as JSON numbers; past ~200k numbers in all the file
# grows to megabytes, so a big input (3x224x224: 150,528 numbers) keeps one golden sample.
GOLDEN_NUMBERS = 200_000
# NOTE: the row cap bounds one backend call's input; 16 MiB keeps 64 rows for small samples and
# 27 rows of 3x224x224 float32.
BATCH_INPUT_BYTES = 16 << 20
DEFAULT_ROW_CAP = 64
# NOTE: the export proves bitwise batch invariance at every batch size up to the cap: about
# cap**2 / 2 rows of inference (512: 131k rows).
MAX_ROW_CAP = 4096
MAX_RTOL = 1e-3  # the manifest's bound (service.store.Verification)
NOISE_SAMPLES = 8


@dataclass(frozen=True)
class ModelCard:
    """What the manifest says about the model, apart from files and checks."""

    name: str
    architecture: str
    task: Task
    sample_shape: tuple[int, ...]
    labels: list[str] = field(default_factory=list)
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    max_batch_size: int | None = None  # the row cap; None: row_cap(sample_shape)
    # A model of several inputs or outputs: every one, named, in the order the files take and
    # give them (sample_shape is then the row of all inputs side by side: service.packing).
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    image: ImageInput | None = None  # how an image becomes an input, for image requests

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.inputs or (TensorSpec(name=self.input_name, shape=self.sample_shape),)

    def output_specs(self, expected: Array) -> tuple[TensorSpec, ...]:
        """``expected``: the reference outputs, rows first (their shape, for one output)."""
        return self.outputs or (TensorSpec(name=self.output_name, shape=expected.shape[1:]),)


@dataclass(frozen=True)
class Folded:
    """A model with every BatchNorm folded, serialized and not yet verified."""

    files: list[ExportedFile]
    records: tuple[BatchNormRecord, ...]
    fold_path: FoldPath
    note: str | None = None  # why the fallback path was taken, if it was


@dataclass(frozen=True)
class BuildResult:
    path: Path  # the new version's folder
    manifest: Manifest
    folded: Folded
    verified: VerifiedExport
    seconds: dict[str, float]  # wall time per step


def row_cap(sample_shape: tuple[int, ...]) -> int:
    sample_bytes = 4 * max(1, math.prod(sample_shape))
    return max(1, min(DEFAULT_ROW_CAP, BATCH_INPUT_BYTES // sample_bytes))


def task_for(expected: Array, labels: Sequence[str], task: Task | None = None) -> Task:
    """The task stated, or the one the reference outputs and the labels imply; labels that do not
    fit the outputs are refused here, before any fold or check runs.

    Several output columns are classes (predictions: the arg-max, as a label or an index), one
    column is a number (regression), an output with spatial axes is segmentation; labels make
    any output classes.
    """
    per_sample = math.prod(expected.shape[1:])
    if labels and len(labels) != per_sample:
        raise FoldingError(
            f"{len(labels)} labels for {per_sample} outputs per sample: give one label per "
            "output column, or none"
        )
    if task is not None:
        return task
    if labels or (expected.ndim == 2 and expected.shape[1] > 1):
        return "classification"
    return "segmentation" if expected.ndim > 2 else "regression"


def describe_task(manifest: Manifest) -> str:
    """The task as the summary says it, with what it means for the answers."""
    columns = math.prod(manifest.outputs[0].shape)
    # NOTE: predictions read the first output: with several, the summary says which.
    read = f" of output {manifest.outputs[0].name!r}" if len(manifest.outputs) > 1 else ""
    if manifest.task == "classification" and manifest.labels:
        return f"classification ({len(manifest.labels)} labels{read})"
    if manifest.task == "classification":
        return (
            f"classification ({columns} columns{read}, no labels: predictions are column "
            "indices; --task regression if they are not classes)"
        )
    if manifest.task == "regression":
        values = f"{columns} value{'' if columns == 1 else 's'}"
        return f"regression ({values} per sample, no predictions)"
    return "segmentation (an output per pixel, no predictions)"


def check_row_cap(rows: int | None) -> None:
    """A row cap asked for: bitwise invariance is proven at every batch size up to it."""
    if rows is not None and not 1 <= rows <= MAX_ROW_CAP:
        raise FoldingError(
            f"max_batch_size={rows}: must be 1 to {MAX_ROW_CAP} (every batch size up to it is "
            "checked bit for bit at export)"
        )


def fold_and_serialize(
    model: nn.Module,
    example: Examples,
    input_names: Sequence[str] = (INPUT_NAME,),
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> Folded:
    """Fold with torch.fx and write ONNX + TorchScript; if fx cannot trace the model faithfully,
    export it unfolded to ONNX and fold there (ONNX only: TorchScript would keep the BNs).

    ``example``: one batch per input; a model of several inputs or outputs takes them by
    position and returns a tuple (``foldserve.several.Named``), written under these names."""
    from foldserve.fold import UntraceableError, as_examples, fold_batch_norms, prepare_eval_copy
    from foldserve.serialize import export_onnx, export_torchscript

    examples = as_examples(example)
    try:
        fold = fold_batch_norms(model, examples)
    except UntraceableError as exc:
        from foldserve.onnx_fold import fold_onnx_batch_norms

        copy = prepare_eval_copy(model)
        note = f"folded in ONNX: {exc.message}"
        unfolded = export_onnx(copy, examples, False, input_names, output_names)
        feeds = dict(zip(input_names, (e.numpy() for e in examples), strict=True))
        if not _runs(unfolded, feeds):
            # NOTE: unoptimized, the exporter sometimes writes graphs ONNX Runtime cannot run
            # (a bias built at run time with the weight's shape, seen in MONAI's 3-D HighResNet).
            # Its optimizer repairs them but folds some Conv+BN pairs itself: those BNs are then
            # gone before our fold, and missing from the report.
            unfolded = export_onnx(copy, examples, True, input_names, output_names)
            note += "; exported with torch's ONNX optimizer, which folded some BNs itself"
        result = fold_onnx_batch_norms(onnx.load_model_from_string(unfolded))
        content = result.model.SerializeToString()
        return Folded(
            files=[ExportedFile("onnx", FILENAMES["onnx"], content)],
            records=result.records,
            fold_path="onnx",
            note=note,
        )
    return Folded(
        files=[
            ExportedFile(
                "onnx",
                FILENAMES["onnx"],
                export_onnx(fold.module, examples, True, input_names, output_names),
            ),
            ExportedFile(
                "torchscript", FILENAMES["torchscript"], export_torchscript(fold.module, examples)
            ),
        ],
        records=fold.records,
        fold_path="torch.fx",
    )


def _runs(model: bytes, feeds: dict[str, np.ndarray]) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a graph that cannot run is an answer here, not an error
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
    except Exception:  # onnxruntime raises its own untyped errors
        return False
    return True


def build_version(
    model: nn.Module,
    card: ModelCard,
    check_inputs: Features,
    expected: Array,
    store: Path,
    provenance: Mapping[str, Any],
    *,
    stats_shifts: Mapping[str, StatsShift] | None = None,
    seed: int = 0,
    seconds: dict[str, float] | None = None,
    data_statistics: InputStatistics | None = None,
) -> BuildResult:
    """Fold ``model`` (eval mode, float32, statistics frozen), verify it against ``expected``
    (its outputs on ``check_inputs``) and store it as the next version of ``card.name``. With
    ``card.inputs`` or ``card.outputs`` (several), ``model`` is a ``foldserve.several.Named``:
    it takes them by position and returns a tuple, and ``check_inputs`` are rows of them.
    ``data_statistics``: the drift reference when the model has no input BatchNorm."""
    import torch

    from foldserve.fold import prepare_eval_copy
    from foldserve.input_statistics import module_hidden_statistics, module_input_statistics
    from foldserve.several import Named, Packed
    from foldserve.tensors import float32_noise, release_memory

    seconds = {} if seconds is None else seconds
    inputs, outputs = card.input_specs(), card.output_specs(expected)
    signature = Signature(packing(inputs), packing(outputs))
    rows = np.ascontiguousarray(check_inputs[:2])
    observed: InputStatistics | None = data_statistics
    hidden: list[HiddenMonitor] = []
    if not (card.inputs or card.outputs):  # one tensor in, one bare tensor out
        one = torch.from_numpy(rows)
        # Before folding erases them: the input BN's statistics, for drift monitoring.
        observed = module_input_statistics(model, one, provenance["bn_stats"]) or observed
        # And of the hidden BNs whose input is an affine map of the raw input, with that map.
        hidden = module_hidden_statistics(model, one, provenance["bn_stats"])
        folding: nn.Module = model
        example: Examples = one
    else:
        # NOTE: several inputs or outputs (or one in a list): drift watches the first input,
        # through the data's own statistics (data_statistics); the BN-based monitors look for
        # one input tensor and one bare output.
        example = tuple(torch.from_numpy(t) for t in signature.inputs.unpack(rows))
        folding = model  # a foldserve.several.Named: the inputs by position, a tuple out
    with timed(seconds, "fold+export"):
        folded = fold_and_serialize(
            folding, example, signature.inputs.names, signature.outputs.names
        )
        if card.inputs or card.outputs:  # the BatchNorms as the model itself names them
            folded = _renamed(folded, Named.PREFIX)
    if stats_shifts:
        folded = _with_shifts(folded, stats_shifts)
    release_memory()  # what tracing and exporting freed
    with timed(seconds, "verify"):
        # On the copy folding starts from (norms baked in), as the folded files were made.
        baked = prepare_eval_copy(model)
        if card.inputs or card.outputs:
            baked = Packed(baked, signature)
        noise = float32_noise(baked, check_inputs[:NOISE_SAMPLES])
        del baked  # a copy of every weight, not needed while the exports are checked
        release_memory()
    try:
        return store_verified(
            folded,
            card,
            check_inputs,
            expected,
            store,
            provenance,
            seed=seed,
            seconds=seconds,
            rtol=rtol_for(noise),
            input_statistics=observed,
            hidden_statistics=hidden,
        )
    except VerificationError as exc:
        if 4 * noise <= MAX_RTOL:
            raise
        raise VerificationError(
            f"{exc.message}; note: the unfolded model itself is {noise:.2g} (of its outputs' "
            "scale) away from its float64 outputs, so float32 rounding alone decides its "
            "outputs: the network amplifies rounding (untrained weights or statistics that do "
            "not fit the inputs checked?); check it on real data with --calibration"
        ) from exc


def rtol_for(noise: float) -> float:
    """The relative tolerance of the equivalence check for a network whose own float32 outputs
    are ``noise`` (relative) away from its float64 outputs.

    NOTE: folding changes the order of float32 roundings; through a deep network the difference
    grows like the network's own float32 error (measured: 1.4e-4 of the output's scale through
    SEResNet-152, a fold exact in float64). A fold is held to four times the error float32
    itself makes, never less than RTOL, never more than the manifest's 1e-3 bound; a wrong
    statistic moves outputs far more.
    """
    return float(min(MAX_RTOL, max(RTOL, 4 * noise)))


def store_verified(
    folded: Folded,
    card: ModelCard,
    check_inputs: Features,
    expected: Array,
    store: Path,
    provenance: Mapping[str, Any],
    *,
    seed: int = 0,
    seconds: dict[str, float] | None = None,
    rtol: float = RTOL,
    input_statistics: InputStatistics | None = None,
    hidden_statistics: Sequence[HiddenMonitor] = (),
) -> BuildResult:
    """Verify ``folded`` against ``expected`` and write it, with its manifest, to ``store``
    (with the side files of ``hidden_statistics``, the drift monitors' maps)."""
    seconds = {} if seconds is None else seconds
    check_row_cap(card.max_batch_size)
    cap = card.max_batch_size or row_cap(card.sample_shape)
    inputs, outputs = card.input_specs(), card.output_specs(expected)
    with timed(seconds, "verify"):
        verified = verify_exports(
            folded.files,
            expected,
            check_inputs,
            seed=seed,
            bitwise_max_rows=cap,
            rtol=rtol,
            signature=Signature(packing(inputs), packing(outputs)),
        )
    contents = {export.filename: export.content for export in folded.files}
    contents.update({monitor.filename: monitor.content for monitor in hidden_statistics})
    golden = _golden_count(card.sample_shape, len(check_inputs))

    def make_manifest(version: int, digests: dict[str, str]) -> Manifest:
        return Manifest(
            name=card.name,
            version=version,
            architecture=card.architecture,
            task=card.task,
            inputs=inputs,
            outputs=outputs,
            labels=card.labels,
            files=tuple(
                ModelFile(
                    format=export.format,
                    path=export.filename,
                    sha256=digests[export.filename],
                    size_bytes=len(export.content),
                )
                for export in folded.files
            ),
            batch_norm=folded.records,
            verification=verified.verification,
            provenance=Provenance(
                **provenance,
                fold_path=folded.fold_path,
                onnx_opset=onnx_opset(contents[FILENAMES["onnx"]]),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            ),
            golden=Golden(
                inputs=packing(inputs).values_of(check_inputs[:golden]),
                outputs=packing(outputs).values_of(verified.outputs["onnx"][:golden]),
            ),
            batching=BatchingConfig(max_batch_size=cap),
            input_statistics=input_statistics,
            hidden_statistics=tuple(monitor.statistics for monitor in hidden_statistics),
            image=card.image,
        )

    with timed(seconds, "store"):
        path = write_version(store, card.name, contents, make_manifest)
    return BuildResult(path, read_manifest(path), folded, verified, seconds)


def onnx_opset(model: bytes) -> int:
    """The default-domain opset the file declares (an exporter may raise the one asked for)."""
    proto = onnx.load_model_from_string(model)
    return next(
        int(entry.version) for entry in proto.opset_import if entry.domain in ("", "ai.onnx")
    )


def _with_shifts(folded: Folded, shifts: Mapping[str, StatsShift]) -> Folded:
    records = tuple(
        record.model_copy(update={"stats_shift": shifts.get(record.name)})
        for record in folded.records
    )
    return Folded(folded.files, records, folded.fold_path, folded.note)


def _renamed(folded: Folded, prefix: str) -> Folded:
    def own(name: str | None) -> str | None:
        return None if name is None else name.removeprefix(prefix)

    records = tuple(
        record.model_copy(update={"name": own(record.name), "target": own(record.target)})
        for record in folded.records
    )
    return Folded(folded.files, records, folded.fold_path, folded.note)


def _golden_count(sample_shape: tuple[int, ...], available: int) -> int:
    per_sample = max(1, math.prod(sample_shape))
    return max(1, min(GOLDEN_SAMPLES, GOLDEN_NUMBERS // per_sample, available))


@contextlib.contextmanager
def timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start
