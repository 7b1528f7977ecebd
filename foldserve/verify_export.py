"""Prove an export before it is stored, with the server's own backends and checks.

The candidate files are written to a temporary folder and loaded exactly as the server will load
them. Each must (a) hold no batch-statistics op, (b) match the unfolded eval-mode model on every
held-out sample, and (c) give every probe the same output alone as inside batches of very
different samples. Any failure raises ``VerificationError``; the caller then stores nothing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foldserve.tensors import Features
from service.backends import Array, BackendOptions, load_backend
from service.errors import VerificationError
from service.store import ModelFormat, Verification
from service.verify import (
    check_batch_invariance,
    check_no_batch_statistics,
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
) -> VerifiedExport:
    """Check every exported file against ``expected``, the unfolded eval-mode model's outputs on
    ``held_out``; with ``bitwise_max_rows`` > 1, also measure bitwise batch invariance in ONNX
    Runtime up to that many rows (recorded, never refused: the tolerance check is the gate)."""
    outputs: dict[ModelFormat, Array] = {}
    max_abs_diff: dict[ModelFormat, float] = {}
    max_rel_diff: dict[ModelFormat, float] = {}
    bitwise: bool | None = None
    invariance = 0.0
    with tempfile.TemporaryDirectory(prefix="foldserve-verify-") as folder:
        for export in exports:
            path = Path(folder) / export.filename
            path.write_bytes(export.content)
            backend = load_backend(export.format, path, BackendOptions(device="cpu"))
            check_no_batch_statistics(backend)
            actual = backend.run(held_out)
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
                    held_out[:BATCH_INVARIANCE_PROBES],
                    wild_mates(held_out, rng),
                    atol=atol,
                    # The server holds batch invariance to RTOL whatever the manifest's rtol.
                    rtol=min(rtol, RTOL),
                    rng=rng,
                ),
            )
            outputs[export.format] = actual
            max_abs_diff[export.format] = _max_diff(actual, expected)
            max_rel_diff[export.format] = max_relative_diff(actual, expected)
            if export.format == "onnx" and bitwise_max_rows > 1:
                probes = held_out[:BITWISE_PROBES]
                bitwise = is_bitwise_batch_invariant(backend, probes, bitwise_max_rows)
    verification = Verification(
        atol=atol,
        rtol=rtol,
        batch_statistics_ops=0,  # check_no_batch_statistics raised otherwise
        max_abs_diff=max_abs_diff,
        max_rel_diff=max_rel_diff,
        batch_invariance_max_diff=invariance,
        samples_checked=len(held_out),
        bitwise_batch_invariant=bitwise,
        bitwise_max_rows=bitwise_max_rows if bitwise is not None else None,
    )
    return VerifiedExport(verification=verification, outputs=outputs)


def _max_diff(actual: Array, expected: Array) -> float:
    return float(np.abs(actual - expected).max(initial=0.0))
