"""Prove an export before it is stored, with the server's own backends and checks.

The candidate files are written to a temporary folder and loaded exactly as the server will load
them. Each must (a) hold no batch-statistics op, (b) match the unfolded eval-mode model on every
held-out sample, and (c) give every probe the same output alone as inside batches of very
different samples. Any failure raises ``VerificationError``; the caller then stores nothing.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foldserve.tensors import Features, release_memory, rows_per_step
from service.backends import Array, Backend, BackendOptions, load_backend
from service.batching_policy import THREADS_FROM_MS
from service.cpus import usable_cpus
from service.errors import VerificationError
from service.packing import Signature
from service.store import ModelFormat, Verification
from service.verify import (
    BITWISE_BUDGET_VALUES,
    bitwise_cost,
    check_batch_invariance,
    check_no_batch_statistics,
    invariance_batch_sizes,
    is_bitwise_batch_invariant,
    max_relative_diff,
    wild_mates,
    within_tolerance,
)

# NOTE: folding rewrites weights in float64 and rounds once to float32, so the folded graph
# differs from the unfolded one by float32 rounding (~1e-6 of the output's scale measured);
# 1e-4 absolute plus 1e-4 of each sample's largest output leaves room for other CPUs' kernels but
# catches any real statistics change.
ATOL = 1e-4
RTOL = 1e-4
BATCH_INVARIANCE_PROBES = 16
BITWISE_PROBES = 8
# NOTE: the batch checks' cost grows with the input. Unbounded (16 probes in batches of 2, 7 and
# 32 per format, and every batch size up to the cap bit for bit) they took 551 s of a ResNet-50
# export at 3x224x224. Each is bounded by the input values it sends through the model, as the
# server's own load checks are: the same batch sizes as the server's (service.verify), fewer
# probes, and the bitwise check up to the largest batch size that fits.
EXPORT_CHECK_VALUES = BITWISE_BUDGET_VALUES


def invariance_plan(sample_values: int, max_rows: int | None) -> tuple[int, tuple[int, ...]]:
    """How many probes, in which batch sizes, the export's tolerance check of batch invariance
    uses: the server's sizes for this input and row cap, and as many probes (2 to 16) as fit
    EXPORT_CHECK_VALUES."""
    sizes = invariance_batch_sizes(sample_values, max_rows)
    per_probe = (1 + sum(sizes)) * sample_values
    return max(2, min(BATCH_INVARIANCE_PROBES, EXPORT_CHECK_VALUES // per_probe)), sizes


def bitwise_rows(probes: Array, max_rows: int) -> int:
    """The largest batch size up to ``max_rows`` whose bitwise check (every size from 2 up to
    it) fits EXPORT_CHECK_VALUES; 1 when not even a batch of 2 does."""
    rows = max_rows
    while rows > 1 and bitwise_cost(probes, rows) > EXPORT_CHECK_VALUES:
        rows -= 1
    return rows


@dataclass(frozen=True)
class ExportedFile:
    format: ModelFormat
    filename: str
    content: bytes


@dataclass(frozen=True)
class VerifiedExport:
    verification: Verification  # what goes into the manifest
    outputs: dict[ModelFormat, Array]  # each format's outputs on the held-out inputs


def verify_exports(
    exports: Sequence[ExportedFile],
    expected: Array,
    held_out: Features,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    seed: int = 0,
    bitwise_max_rows: int = 0,
    signature: Signature | None = None,
) -> VerifiedExport:
    """Check every exported file against ``expected``, the unfolded eval-mode model's outputs on
    ``held_out``; with ``bitwise_max_rows`` > 1, also measure bitwise batch invariance in ONNX
    Runtime up to that many rows, or as many as ``bitwise_rows`` allows (recorded, never refused:
    the tolerance check is the gate). ``signature``: the model's inputs and outputs, for one of
    several (their rows side by side: ``service.packing``)."""
    outputs: dict[ModelFormat, Array] = {}
    max_abs_diff: dict[ModelFormat, float] = {}
    max_rel_diff: dict[ModelFormat, float] = {}
    bitwise: bool | None = None
    invariance = 0.0
    sample_values = int(np.prod(held_out.shape[1:]))
    probe_count, sizes = invariance_plan(sample_values, bitwise_max_rows or None)
    bitwise_probes = held_out[:BITWISE_PROBES]
    measured_rows = bitwise_rows(bitwise_probes, bitwise_max_rows) if bitwise_max_rows > 1 else 0
    with tempfile.TemporaryDirectory(prefix="foldserve-verify-") as folder:
        for export in exports:
            path = Path(folder) / export.filename
            path.write_bytes(export.content)
            backend = _loaded(export.format, path, held_out[:1], signature)
            check_no_batch_statistics(backend)
            # In the steps the reference was computed in (27 images of 3x224x224 at once held
            # more than a gigabyte of activations); the same steps, so a model that mixes the
            # samples of a batch agrees here and is caught by the invariance check, by name.
            actual = _run_in_steps(backend, held_out, rows_per_step(held_out.shape[1:]))
            if not within_tolerance(actual, expected, atol, rtol):
                raise VerificationError(
                    f"{export.format} outputs differ from the unfolded eval-mode model by up to "
                    f"{_max_diff(actual, expected):.3g} ({max_relative_diff(actual, expected):.3g}"
                    f" of the sample's largest output) on {len(held_out)} checked samples "
                    f"(tolerance atol={atol:g}, rtol={rtol:g})"
                )
            # Same seed per format: every format faces the same probes and batch mates.
            rng = np.random.default_rng(seed)
            invariance = max(
                invariance,
                check_batch_invariance(
                    backend,
                    held_out[:probe_count],
                    wild_mates(
                        held_out,
                        rng,
                        count=max(sizes),
                        rows=signature.inputs if signature is not None else None,
                    ),
                    atol=atol,
                    # The server holds batch invariance to RTOL whatever the manifest's rtol.
                    rtol=min(rtol, RTOL),
                    rng=rng,
                    batch_sizes=sizes,
                ),
            )
            outputs[export.format] = actual
            max_abs_diff[export.format] = _max_diff(actual, expected)
            max_rel_diff[export.format] = max_relative_diff(actual, expected)
            if export.format == "onnx" and measured_rows > 1:
                bitwise = is_bitwise_batch_invariant(backend, bitwise_probes, measured_rows)
            del backend  # before the next format's is loaded: one model in memory at a time
            release_memory()
    verification = Verification(
        atol=atol,
        rtol=rtol,
        batch_statistics_ops=0,  # check_no_batch_statistics raised otherwise
        max_abs_diff=max_abs_diff,
        max_rel_diff=max_rel_diff,
        batch_invariance_max_diff=invariance,
        samples_checked=len(held_out),
        bitwise_batch_invariant=bitwise,
        bitwise_max_rows=measured_rows if bitwise is not None else None,
    )
    return VerifiedExport(verification=verification, outputs=outputs)


def _loaded(
    fmt: ModelFormat, path: Path, one_row: Array, signature: Signature | None = None
) -> Backend:
    """The backend as the server would load it here: all usable cores for a model slow enough
    to gain from them (service.batching_policy's rule), one thread for the others."""
    # No memory arena: each check's batch is freed once run, not kept for a next one (the
    # bitwise check's largest batch of 3x224x224 images held 728 MiB through the rest).
    options = BackendOptions(device="cpu", memory_arena=False)
    backend = load_backend(fmt, path, options, signature)
    cpus = usable_cpus()
    if cpus == 1:
        return backend
    backend.run(one_row)  # the first run allocates: not timed
    started = time.perf_counter()
    backend.run(one_row)
    if (time.perf_counter() - started) * 1000.0 < THREADS_FROM_MS:
        return backend
    del backend  # one session of the model at a time
    options = BackendOptions(device="cpu", intra_op_threads=cpus, memory_arena=False)
    return load_backend(fmt, path, options, signature)


def _run_in_steps(backend: Backend, x: Array, rows: int) -> Array:
    return np.concatenate([backend.run(x[i : i + rows]) for i in range(0, len(x), rows)])


def _max_diff(actual: Array, expected: Array) -> float:
    return float(np.abs(actual - expected).max(initial=0.0))
