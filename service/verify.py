"""Checks that prove a model never normalizes with batch statistics; shared by exporter and server.

A model is served only after: its files match the manifest's sha256, its program holds no
batch-statistics op, the golden inputs give the golden outputs, and every probe sample's output
is the same alone as inside batches of very different samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.backends import Array, Backend
from service.errors import VerificationError
from service.packing import Packing, packing
from service.store import Manifest, sha256_file

# Float32 batched kernels reorder sums (differences ~1e-7 of an output's scale); a BN using batch
# statistics moves outputs by a large fraction of it. Anything in between is refused.
INVARIANCE_ATOL = 1e-4
INVARIANCE_RTOL = 1e-4
# What rtol multiplies: see within_tolerance.
TOLERANCE_BASIS = "per-sample max |output|"
INVARIANCE_BATCH_SIZES = (2, 7, 32)
# A change this many times the bound is blamed on batch statistics, a smaller one on rounding.
BATCH_STATISTICS_FACTOR = 10.0
# Input values one probe may send through the model in its invariance batches (alone + mates):
# 4M values (16 MiB of float32) keep all of (2, 7, 32) up to ~100k values per sample (3x160x160
# keeps them); a 3x224x224 image keeps (2, 7): 10 rows per probe instead of 42.
INVARIANCE_BUDGET_VALUES = 1 << 22
# Input values the bitwise check may run when nobody asked for it (see bitwise_cost): the shipped
# 64-value models at a 64-row cap cost 0.13M; a 3x224x224 image at 64 rows costs 314M.
BITWISE_BUDGET_VALUES = 1 << 24


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * max|expected|`` over each sample."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class BitwiseMeasurement:
    """This runtime's answer to "is every output bit for bit the same in any batch?"."""

    invariant: bool | None  # None: not measured here (see note)
    max_rows: int  # batches of 2 up to this many rows (the version's row cap)
    note: str
    first_difference: int | None = None  # the first batch size whose outputs differ


@dataclass(frozen=True)
class VerificationReport:
    golden_max_abs_diff: float
    batch_invariance_max_diff: float
    golden_tolerance: Tolerance  # the manifest's
    invariance_tolerance: Tolerance  # the manifest's, never looser than the server's
    invariance_batch_sizes: tuple[int, ...]


def check_files(directory: Path, manifest: Manifest) -> None:
    # NOTE: messages name the file inside its version (model.onnx), not the server's path: they
    # reach clients through /models and readiness.
    for entry in manifest.checked_files():  # the models, and side files such as monitor maps
        path = directory / entry.path
        if not path.is_file():
            raise VerificationError(f"{entry.path}: file listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise VerificationError(
                f"{entry.path}: sha256 {actual[:12]}… does not match the manifest's "
                f"{entry.sha256[:12]}…"
            )


def check_no_batch_statistics(backend: Backend) -> None:
    found = backend.batch_statistics_ops()
    if found:
        raise VerificationError(
            f"{backend.format} program still holds batch-statistics ops: {', '.join(found[:5])}"
        )


def sample_scale(outputs: Array) -> Array:
    """Each sample's largest |output|, shaped to broadcast over that sample's outputs."""
    flat = np.abs(outputs.reshape(len(outputs), -1))
    scale: Array = flat.max(axis=1, initial=0.0).reshape((-1,) + (1,) * (outputs.ndim - 1))
    return scale


def within_tolerance(actual: Array, expected: Array, atol: float, rtol: float) -> bool:
    """``|actual - expected| <= atol + rtol * max|expected|`` per sample; NaN or inf never passes.

    NOTE: the relative part is taken on the sample's scale, not element by element: float32
    rounding of a sum is relative to the terms summed, so an output near 0 beside outputs of
    10^3 carries an error of 10^3 * 2^-24 that an element-wise bound would call a change.
    """
    if actual.shape != expected.shape:
        raise VerificationError(f"output shape {actual.shape} != expected {expected.shape}")
    if not (np.isfinite(actual).all() and np.isfinite(expected).all()):
        raise VerificationError("non-finite outputs: a model and its reference must be finite")
    # NOTE: written as "not (diff <= bound)" so that any NaN that slipped through fails.
    return bool(np.all(np.abs(actual - expected) <= atol + rtol * sample_scale(expected)))


def max_relative_diff(actual: Array, expected: Array) -> float:
    """The largest difference as a fraction of its sample's largest |expected| output."""
    scale = np.maximum(sample_scale(expected), np.finfo(np.float32).tiny)
    return float((np.abs(actual - expected) / scale).max(initial=0.0))


def check_golden(backend: Backend, manifest: Manifest) -> float:
    inputs = golden_inputs(manifest)
    expected = packing(manifest.outputs).rows(manifest.golden.outputs)
    out_shape = expected.shape[1:]
    actual = backend.run(inputs)
    if actual.shape != expected.shape:
        raise VerificationError(
            f"model returns outputs shaped {actual.shape[1:]} per sample, the manifest says "
            f"{out_shape}"
        )
    atol, rtol = manifest.verification.atol, manifest.verification.rtol
    if not within_tolerance(actual, expected, atol, rtol):
        diff = float(np.abs(actual - expected).max())
        raise VerificationError(
            f"golden outputs differ by up to {diff:.3g} (tolerance atol={atol:g}, rtol={rtol:g})"
        )
    return float(np.abs(actual - expected).max(initial=0.0))


def check_batch_invariance(
    backend: Backend,
    probes: Array,
    mates: Array,
    *,
    atol: float,
    rtol: float,
    rng: np.random.Generator,
    batch_sizes: tuple[int, ...] = (2, 7, 32),
) -> float:
    """Each probe's output alone must equal its output inside batches of random mates.

    Equal means within ``atol + rtol * max|alone|``; returns the largest absolute change seen.
    """
    worst = 0.0
    for probe in probes:
        alone = backend.run(probe[np.newaxis])[0]
        bound = atol + rtol * float(np.abs(alone).max(initial=0.0))
        for size in batch_sizes:
            position = int(rng.integers(size))
            batch = mates[rng.integers(len(mates), size=size)].copy()
            batch[position] = probe
            inside = backend.run(batch)[position]
            diff = float(np.abs(inside - alone).max(initial=0.0))
            worst = max(worst, diff)
            if not diff <= bound:
                raise VerificationError(
                    f"a sample's output changes by {diff:.3g} (> {bound:.3g}: atol {atol:g} + "
                    f"rtol {rtol:g} x its scale) when it shares a batch of {size}: "
                    + _likely_cause(diff, bound)
                )
    return worst


def _likely_cause(diff: float, bound: float) -> str:
    # Batch statistics move an output by about its own scale; float32 rounding that a deep
    # network amplifies (other kernel blocking for another batch size) lands just past the bound.
    if diff > BATCH_STATISTICS_FACTOR * bound:
        return "the model normalizes with batch statistics"
    return (
        "a change this small is float32 rounding that the network amplifies (untrained weights "
        "or statistics that do not fit the inputs?) or a mild dependence on batch mates"
    )


def is_bitwise_batch_invariant(backend: Backend, probes: Array, max_rows: int) -> bool:
    """True when every probe's output alone is bit for bit its output at each position it takes
    inside batches of every size from 2 to ``max_rows`` (the probes repeated cyclically).

    Costs about ``max_rows**2 / 2`` rows of inference. Stronger than the tolerance check: it also
    rules out kernels that pick another summation order for another batch size.
    """
    return first_bitwise_difference(backend, probes, max_rows) is None


def first_bitwise_difference(backend: Backend, probes: Array, max_rows: int) -> int | None:
    """The smallest batch size at which some probe's output is not bit for bit its output alone;
    None when there is none up to ``max_rows`` (see is_bitwise_batch_invariant)."""
    alone = np.concatenate([backend.run(probe[np.newaxis]) for probe in probes])
    count = len(probes)
    for size in range(2, max_rows + 1):
        order = (np.arange(size) + size) % count  # a different rotation for each size
        if not np.array_equal(backend.run(probes[order]), alone[order]):
            return size
    return None


def bitwise_cost(probes: Array, max_rows: int) -> int:
    """Input values first_bitwise_difference sends through the model: each probe alone, then
    every batch size from 2 to ``max_rows``."""
    rows = len(probes) + sum(range(2, max_rows + 1))
    return rows * math.prod(probes.shape[1:])


def measure_bitwise(
    backend: Backend, probes: Array, max_rows: int, *, required: bool
) -> BitwiseMeasurement:
    """Measure bitwise batch invariance on this runtime when ``required`` or cheap.

    Cheap means at most BITWISE_BUDGET_VALUES input values (``bitwise_cost``); above it an
    unrequired measurement is skipped, so a large model does not pay ``max_rows**2 / 2`` rows of
    inference at every start for a figure nobody asked for.
    """
    cost = bitwise_cost(probes, max_rows)
    if not required and cost > BITWISE_BUDGET_VALUES:
        return BitwiseMeasurement(
            None,
            max_rows,
            f"not measured here: {cost:,} input values through the model, over the "
            f"{BITWISE_BUDGET_VALUES:,} measured unasked",
        )
    first = first_bitwise_difference(backend, probes, max_rows)
    if first is None:
        rows = f"every batch size from 2 to {max_rows}" if max_rows > 1 else "batches of 1"
        note = f"{len(probes)} golden inputs, alone and in {rows}"
        return BitwiseMeasurement(True, max_rows, note)
    note = f"outputs alone and in a batch of {first} are not bit for bit the same (golden inputs)"
    return BitwiseMeasurement(False, max_rows, note, first)


def wild_mates(
    inputs: Array, rng: np.random.Generator, count: int = 64, rows: Packing | None = None
) -> Array:
    """Batch mates far from the probes: rescaled, shifted and noisy copies of real inputs.

    ``rows``: how the inputs make a row, when they are not float32 values: each input's mates
    are then made in its own dtype (integers: real values, picked at random)."""
    picks = inputs[rng.integers(len(inputs), size=count)]
    if rows is None or rows.dtype == np.float32:
        return _noisy(picks, rng, float(np.std(inputs)))
    tensors = []
    for part, spec in zip(rows.unpack(picks), rows.specs, strict=True):
        if spec.dtype in ("float32", "float16"):
            limit = float(np.finfo(spec.dtype).max)
            noisy = _noisy(part.astype(np.float32), rng, float(np.std(part)))
            tensors.append(np.clip(noisy, -limit, limit).astype(spec.dtype))
        else:  # ids, pixels: values the model was given, shuffled across the mates
            tensors.append(part[rng.permutation(len(part))])
    return rows.pack(tensors)


def _noisy(picks: Array, rng: np.random.Generator, spread: float) -> Array:
    scale = rng.uniform(0.0, 4.0, size=(len(picks),) + (1,) * (picks.ndim - 1))
    noise = rng.normal(0.0, spread + 1.0, size=picks.shape)
    return (picks * scale + noise).astype(np.float32)


def golden_inputs(manifest: Manifest) -> Array:
    """The golden samples as rows (several inputs side by side: ``service.packing``)."""
    return packing(manifest.inputs).rows(manifest.golden.inputs)


def invariance_batch_sizes(sample_values: int, max_rows: int | None = None) -> tuple[int, ...]:
    """The batch sizes the tolerance check of batch invariance tries, for one model version.

    INVARIANCE_BATCH_SIZES, with each size above the row cap ``max_rows`` lowered to the cap
    (larger batches never run in serving), then cut to what one probe's batches (and the probe
    alone) fit in INVARIANCE_BUDGET_VALUES input values, so big inputs are not absurdly slow to
    load. A batch of 2 is always tried: it is the smallest proof that a batch mate changes
    nothing, and catches a BatchNorm left in training mode.
    """
    cap = max(2, max_rows if max_rows is not None else max(INVARIANCE_BATCH_SIZES))
    sizes = sorted({min(size, cap) for size in INVARIANCE_BATCH_SIZES})
    kept, rows = [2], 1 + 2
    for size in sizes[1:]:
        rows += size
        if rows * sample_values > INVARIANCE_BUDGET_VALUES:
            break
        kept.append(size)
    return tuple(kept)


def verify_loaded_model(
    manifest: Manifest, backend: Backend, max_rows: int | None = None
) -> VerificationReport:
    """Everything the server checks before a model version is served (files checked first).

    ``max_rows`` is the version's row cap in serving; it and the input size choose the batch
    sizes of the batch-invariance check (see invariance_batch_sizes).
    """
    check_no_batch_statistics(backend)
    golden_diff = check_golden(backend, manifest)
    inputs = golden_inputs(manifest)
    sizes = invariance_batch_sizes(packing(manifest.inputs).values, max_rows)
    rng = np.random.default_rng(0)
    # The artifact states its own tolerance, but batch invariance is the product's promise:
    # the server never accepts a looser bound than its own.
    bound = Tolerance(
        atol=min(manifest.verification.atol, INVARIANCE_ATOL),
        rtol=min(manifest.verification.rtol, INVARIANCE_RTOL),
    )
    invariance = check_batch_invariance(
        backend,
        inputs[:4],
        # As many mates as the largest batch holds: for large inputs the mates are megabytes.
        wild_mates(inputs, rng, count=max(sizes), rows=packing(manifest.inputs)),
        atol=bound.atol,
        rtol=bound.rtol,
        rng=rng,
        batch_sizes=sizes,
    )
    return VerificationReport(
        golden_max_abs_diff=golden_diff,
        batch_invariance_max_diff=invariance,
        golden_tolerance=Tolerance(manifest.verification.atol, manifest.verification.rtol),
        invariance_tolerance=bound,
        invariance_batch_sizes=sizes,
    )
