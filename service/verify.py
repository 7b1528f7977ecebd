"""Checks that prove a model never normalizes with batch statistics; shared by exporter and server.

A model is served only after: its files match the manifest's sha256, its program holds no
batch-statistics op, the golden inputs give the golden outputs, and every probe sample's output
is the same alone as inside batches of very different samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.backends import Array, Backend
from service.errors import VerificationError
from service.store import Manifest, sha256_file

# Float32 batched kernels reorder sums (differences ~1e-6 on logits of size ~10); a BN using batch
# statistics moves outputs by whole units. Anything in between is refused.
INVARIANCE_ATOL = 1e-4


@dataclass(frozen=True)
class VerificationReport:
    golden_max_abs_diff: float
    batch_invariance_max_diff: float


def check_files(directory: Path, manifest: Manifest) -> None:
    for entry in manifest.files:
        path = directory / entry.path
        if not path.is_file():
            raise VerificationError(f"{path}: file listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise VerificationError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest's {entry.sha256[:12]}…"
            )


def check_no_batch_statistics(backend: Backend) -> None:
    found = backend.batch_statistics_ops()
    if found:
        raise VerificationError(
            f"{backend.format} program still holds batch-statistics ops: {', '.join(found[:5])}"
        )


def within_tolerance(actual: Array, expected: Array, atol: float, rtol: float) -> bool:
    """``|actual - expected| <= atol + rtol*|expected|`` everywhere; NaN or inf never passes."""
    if actual.shape != expected.shape:
        raise VerificationError(f"output shape {actual.shape} != expected {expected.shape}")
    if not (np.isfinite(actual).all() and np.isfinite(expected).all()):
        raise VerificationError("non-finite outputs: a model and its reference must be finite")
    # NOTE: written as "not (diff <= bound)" so that any NaN that slipped through fails.
    return bool(np.all(np.abs(actual - expected) <= atol + rtol * np.abs(expected)))


def check_golden(backend: Backend, manifest: Manifest) -> float:
    inputs = golden_inputs(manifest)
    out_shape = manifest.outputs[0].shape
    expected = np.asarray(manifest.golden.outputs, dtype=np.float32).reshape(-1, *out_shape)
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
    rng: np.random.Generator,
    batch_sizes: tuple[int, ...] = (2, 7, 32),
) -> float:
    """Each probe's output alone must equal its output inside batches of random mates."""
    worst = 0.0
    for probe in probes:
        alone = backend.run(probe[np.newaxis])[0]
        for size in batch_sizes:
            position = int(rng.integers(size))
            batch = mates[rng.integers(len(mates), size=size)].copy()
            batch[position] = probe
            inside = backend.run(batch)[position]
            diff = float(np.abs(inside - alone).max(initial=0.0))
            worst = max(worst, diff)
            if not diff <= atol:
                raise VerificationError(
                    f"a sample's output changes by {diff:.3g} (> {atol:g}) when it shares a batch "
                    f"of {size}: the model normalizes with batch statistics"
                )
    return worst


def wild_mates(inputs: Array, rng: np.random.Generator, count: int = 64) -> Array:
    """Batch mates far from the probes: rescaled, shifted and noisy copies of real inputs."""
    picks = inputs[rng.integers(len(inputs), size=count)]
    scale = rng.uniform(0.0, 4.0, size=(count,) + (1,) * (inputs.ndim - 1))
    noise = rng.normal(0.0, float(np.std(inputs)) + 1.0, size=picks.shape)
    return (picks * scale + noise).astype(np.float32)


def golden_inputs(manifest: Manifest) -> Array:
    shape = manifest.inputs[0].shape
    return np.asarray(manifest.golden.inputs, dtype=np.float32).reshape(-1, *shape)


def verify_loaded_model(manifest: Manifest, backend: Backend) -> VerificationReport:
    """Everything the server checks before a model version is served (files checked first)."""
    check_no_batch_statistics(backend)
    golden_diff = check_golden(backend, manifest)
    inputs = golden_inputs(manifest)
    rng = np.random.default_rng(0)
    invariance = check_batch_invariance(
        backend,
        inputs[:4],
        wild_mates(inputs, rng),
        # The artifact states its own tolerance, but batch invariance is the product's promise:
        # the server never accepts a looser bound than its own.
        atol=min(manifest.verification.atol, INVARIANCE_ATOL),
        rng=rng,
    )
    return VerificationReport(golden_max_abs_diff=golden_diff, batch_invariance_max_diff=invariance)
