"""Put one network through ``foldserve.export`` and measure what it proved and what it costs.

build -> statistics (train-mode passes over generated data) -> eval -> foldserve.export (fold,
export, verify, store in a temporary store) -> the unfolded ONNX file (BatchNormalization ops
kept) -> onnxruntime latency of both, and an independent check of the folded file on fresh inputs.
Any exception is caught and becomes the row's status: foldserve refusing the model (a
FoldserveError) is "refused", anything else is "error".
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bench.zoo import latency, unfolded
from bench.zoo.network import Network
from foldserve.several import found_outputs
from service.errors import FoldserveError
from service.verify import max_relative_diff

STATS_PASSES = 3
STATS_BATCH = 4


@dataclass(frozen=True)
class Options:
    check_samples: int  # generated samples foldserve.export checks on
    bitwise_rows: int  # bitwise batch invariance measured up to this many rows (0: foldserve's cap)
    seed: int = 0


def measure(network: Network, options: Options) -> dict[str, Any]:
    """One row of the report, as JSON-ready figures."""
    row: dict[str, Any] = {
        "name": network.name,
        "factory": network.factory,
        "kwargs": network.kwargs,
        "spatial_dims": network.spatial_dims,
        "task": network.task,
        "input_shape": list(network.input_shape),
    }
    started = time.perf_counter()
    stage = "build"
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(options.seed)
        model = network.build()
        row["batch_norms"] = sum(isinstance(m, _BatchNorm) for m in model.modules())
        row["parameters"] = sum(p.numel() for p in model.parameters())
        stage = "statistics"
        with _timed(row, "statistics_s"):
            with_statistics(model, network.input_shape, options.seed, network.stats_batch)
        stage = "foldserve.export"
        with tempfile.TemporaryDirectory(prefix="zoo-store-") as store:
            _export(row, model, network, options, Path(store))
            stage = "unfolded export"
            # NOTE: foldserve's verification pins torch to one thread; the zoo's own steps use all.
            torch.set_num_threads(os.cpu_count() or 1)
            baseline = _unfolded(row, model, network, options)
            stage = "latency"
            folded = (Path(row.pop("_path")) / "model.onnx").read_bytes()
            _latencies(row, model, folded, baseline, network, options, Path(store))
        row["status"] = "passed"
    except Exception as exc:
        row["status"] = _status(exc, stage, row)
        row["failed_stage"] = stage
        row["traceback"] = traceback.format_exc(limit=-3)[-1000:]
    finally:
        row.pop("_path", None)
        row["wall_s"] = time.perf_counter() - started
        gc.collect()
    return row


def with_statistics(model: nn.Module, shape: tuple[int, ...], seed: int, batch: int) -> nn.Module:
    """Non-trivial running statistics: a few train-mode passes over shifted, scaled N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(STATS_PASSES):
            model(torch.randn(batch, *shape, generator=generator) * 2 + 0.5)
    return model.eval()


def _export(
    row: dict[str, Any], model: nn.Module, network: Network, options: Options, store: Path
) -> None:
    import foldserve
    from foldserve.calibration import Calibration

    rng = np.random.default_rng(options.seed)
    samples = rng.standard_normal((options.check_samples, *network.input_shape), dtype=np.float32)
    calibration = Calibration(
        samples=samples,
        description=f"generated: {len(samples)} samples of N(0, 1), seed {options.seed}",
        generated=True,
    )
    with _timed(row, "export_s"), bitwise_rows(options.bitwise_rows):
        result = foldserve.export(
            model,
            network.input_shape,
            store=store,
            name=_store_name(network),
            calibration=calibration,
        )
    manifest = result.build.manifest
    verification = manifest.verification
    placements = Counter(record.placement for record in manifest.batch_norm)
    row.update(
        _path=str(result.path),
        steps_s=result.build.seconds,
        recorded_batch_norms=len(manifest.batch_norm),
        placements=dict(placements),
        frozen_examples=[r.name for r in manifest.batch_norm if r.placement == "frozen_affine"][:3],
        fold_path=result.build.folded.fold_path,
        fold_note=result.build.folded.note,
        max_abs_diff=verification.max_abs_diff.get("onnx"),
        max_rel_diff=verification.max_rel_diff.get("onnx"),
        max_abs_diff_by_format=verification.max_abs_diff,
        atol=verification.atol,
        rtol=verification.rtol,
        samples_checked=verification.samples_checked,
        batch_invariance_max_diff=verification.batch_invariance_max_diff,
        bitwise_batch_invariant=verification.bitwise_batch_invariant,
        bitwise_max_rows=verification.bitwise_max_rows,
        files={f.format: f.size_bytes for f in manifest.files},
    )


def _unfolded(row: dict[str, Any], model: nn.Module, network: Network, options: Options) -> bytes:
    example = torch.randn(2, *network.input_shape, generator=torch.Generator().manual_seed(1))
    with _timed(row, "unfolded_export_s"):
        baseline = unfolded.export(model, example)
    row["unfolded_onnx_bytes"] = len(baseline.model)
    row["unfolded_batchnorm_ops"] = baseline.batchnorm_ops
    row["unfolded_computed_biases_dropped"] = baseline.computed_biases_dropped
    row["unfolded_via"] = baseline.via
    return baseline.model


def _latencies(
    row: dict[str, Any],
    model: nn.Module,
    folded: bytes,
    baseline: bytes,
    network: Network,
    options: Options,
    scratch: Path,
) -> None:
    rng = np.random.default_rng(options.seed + 1)
    optimized = scratch / "unfolded-as-ort-optimized-it.onnx"
    sessions = {
        "folded": latency.session(folded),
        "unfolded": latency.session(baseline, optimized_to=optimized),
    }
    row["unfolded_batchnorm_ops_unfused_by_ort"] = latency.unfused_batch_norms(baseline, optimized)
    optimized.unlink()
    single = rng.standard_normal((1, *network.input_shape), dtype=np.float32)
    timings: dict[str, dict[str, float]] = {kind: {} for kind in sessions}
    for kind, sess in sessions.items():
        timings[kind]["1"] = latency.time_runs(sess, single).median_ms
    batch_size = latency.large_batch(timings["folded"]["1"])
    batch = rng.standard_normal((batch_size, *network.input_shape), dtype=np.float32)
    for kind, sess in sessions.items():
        timings[kind][str(batch_size)] = latency.time_runs(sess, batch).median_ms
    # An independent check on fresh inputs: the folded file in ORT vs the eval-mode torch model.
    with torch.no_grad():  # every output, in the order the files give them
        expected = [t.numpy() for _, t in found_outputs(model.eval()(torch.from_numpy(batch)))]
    actual = latency.outputs(sessions["folded"], batch)
    baseline_outputs = latency.outputs(sessions["unfolded"], batch)
    pairs = list(zip(actual, expected, strict=True))
    row.update(
        # The baseline is only timed, not verified by foldserve: check it computes the same.
        unfolded_max_rel_diff=max(
            max_relative_diff(b, e) for b, e in zip(baseline_outputs, expected, strict=True)
        ),
        latency_ms=timings,
        latency_batch=batch_size,
        own_check_samples=batch_size,
        output_count=len(expected),
        own_max_abs_diff=max(float(np.abs(a - e).max(initial=0.0)) for a, e in pairs),
        own_max_rel_diff=max(max_relative_diff(a, e) for a, e in pairs),
    )


@contextlib.contextmanager
def bitwise_rows(rows: int) -> Iterator[None]:
    """Bound foldserve's bitwise batch-invariance measurement to ``rows`` rows.

    NOTE: foldserve.export measures it up to the row cap (64 rows for every sample under 256 KiB:
    sum(2..64) = 2,079 rows of inference, whatever the calibration size), which alone would make
    the zoo run for hours; it has no parameter for it, so the zoo lowers the cap for the call.
    """
    from foldserve import pipeline

    original = pipeline.row_cap
    if rows <= 0:
        yield
        return

    def capped(sample_shape: tuple[int, ...]) -> int:
        return min(rows, original(sample_shape))

    pipeline.row_cap = capped
    try:
        yield
    finally:
        pipeline.row_cap = original


def _status(exc: BaseException, stage: str, row: dict[str, Any]) -> str:
    message = " ".join(str(exc).split())[:400]
    if stage in ("build", "statistics") and isinstance(exc, ImportError):
        # An optional dependency of the network (einops, torchvision, ...) is not installed;
        # monai imports some only when forward() first needs them.
        return f"skipped: needs a missing optional dependency: {message.split(' For details')[0]}"
    if "export_s" in row:  # foldserve.export passed; one of the zoo's own measurements failed
        return f"passed (zoo {stage} failed: {type(exc).__name__}: {message})"
    if isinstance(exc, FoldserveError):
        return f"refused: {message}"
    return f"error: {type(exc).__name__}: {message}"


def _store_name(network: Network) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in network.name.lower())[:64]


@contextlib.contextmanager
def _timed(row: dict[str, Any], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    row[key] = time.perf_counter() - start
