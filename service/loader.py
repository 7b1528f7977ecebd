"""Load one version: read and check its files, open its runtime, verify it, decide how it is
batched and run. Pure and blocking: called in a thread, it touches no shared state and returns an
immutable ``Loaded`` (or raises ``LoadFailed`` with what it had learned, for ``/models``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from service.backends import Backend, BackendOptions, load_backend
from service.batching_policy import (
    BatchingChoice,
    full_batch_ms,
    one_row_ms,
    plan,
    row_cap,
    threads_for,
)
from service.drift import DriftMonitor
from service.errors import ConfigError, VerificationError, logged_message, public_message
from service.memory import release_freed, rss_bytes
from service.packing import Signature
from service.parallel_runs import ParallelRuns, choose_parallel_runs
from service.settings import Settings, setting_ref, torchscript_not_allowed
from service.store import (
    Fingerprint,
    Manifest,
    check_inside,
    fingerprint,
    read_manifest,
)
from service.verify import (
    BitwiseMeasurement,
    VerificationReport,
    bitwise_cost,
    check_files,
    golden_inputs,
    measure_bitwise,
    verify_loaded_model,
)

log = logging.getLogger(__name__)


@dataclass
class Learned:
    """What loading found out so far: shown by ``/models`` even when the version failed."""

    fingerprint: Fingerprint = ()
    manifest: Manifest | None = None
    report: VerificationReport | None = None
    bitwise: BitwiseMeasurement | None = None
    backend: Backend | None = None
    memory_bytes: int | None = None  # RSS the version added at load (service.memory)


@dataclass(frozen=True)
class Loaded:
    """A version that passed every check, with its runtime open and its batching decided."""

    fingerprint: Fingerprint
    manifest: Manifest
    backend: Backend
    report: VerificationReport
    bitwise: BitwiseMeasurement
    batching: BatchingChoice
    drift: DriftMonitor = field(compare=False)
    parallel: ParallelRuns = field(compare=False, default=ParallelRuns.off("not chosen"))
    memory_bytes: int | None = None


class LoadFailed(Exception):
    def __init__(self, cause: BaseException, learned: Learned) -> None:
        super().__init__(public_message(cause))
        self.cause = cause
        self.learned = learned


def load_version(settings: Settings, directory: Path, name: str, version: int, cpus: int) -> Loaded:
    """Load ``directory`` as ``name`` v``version``; raises LoadFailed on any failure."""
    learned = Learned()
    try:
        return _load(settings, directory, name, version, cpus, learned)
    except Exception as exc:
        raise LoadFailed(exc, learned) from exc


def _load(
    settings: Settings, directory: Path, name: str, version: int, cpus: int, learned: Learned
) -> Loaded:
    fmt = settings.backend
    release_freed()
    rss_before = rss_bytes()
    # NOTE: the fingerprint first: a version refused for where it lies is then not tried (and
    # logged) again at every rescan, only once its files change.
    learned.fingerprint = fingerprint(directory)
    check_inside(settings.model_store, directory)
    manifest = learned.manifest = read_manifest(directory)
    if (manifest.name, manifest.version) != (name, version):
        raise VerificationError(
            f"manifest says {manifest.name!r} v{manifest.version}, folder is {name}/{version}"
        )
    if fmt == "torchscript" and not settings.allow_torchscript:
        raise ConfigError(torchscript_not_allowed())
    model_file = manifest.file(fmt)
    if model_file is None:
        have = [f.format for f in manifest.files]
        raise VerificationError(f"manifest has no {fmt} file (has {have}); set --backend")
    batching = plan(settings, name, version, manifest)  # a setting that cannot work fails first
    for checked in manifest.checked_files():
        check_inside(settings.model_store, directory / checked.path)
    check_files(directory, manifest)
    path = directory / model_file.path
    threads = settings.intra_op_threads or 1
    signature = Signature.of(manifest)
    options = BackendOptions(settings.device, threads)
    backend = learned.backend = load_backend(fmt, path, options, signature)
    one_row = one_row_ms(backend, manifest)
    wanted = threads_for(settings, one_row, cpus)
    if wanted != threads:
        options = BackendOptions(settings.device, wanted)
        backend = learned.backend = load_backend(fmt, path, options, signature)
        threads = wanted
    cap = row_cap(
        settings,
        name,
        batching.max_batch_size,
        one_row,
        lambda: load_backend(
            fmt, path, BackendOptions(settings.device, threads, memory_arena=False), signature
        ),
        manifest,
    )
    release_freed()  # the probe's runs allocated outside any arena: hand that back
    if cap.rows != batching.max_batch_size:
        log.info("model %s v%s: %s", name, version, cap.why)
        batching = replace(batching, max_batch_size=cap.rows)
    log.info(
        "model %s v%s: one row takes %.2f ms on one thread, so %d intra-op thread%s (%s)",
        name,
        version,
        one_row,
        threads,
        "" if threads == 1 else "s",
        f"intra_op_threads={settings.intra_op_threads}"
        if settings.intra_op_threads is not None
        else f"auto: {cpus} usable CPU{'' if cpus == 1 else 's'}",
    )
    report = learned.report = verify_loaded_model(manifest, backend, batching.max_batch_size)
    bits = learned.bitwise = _measure_bitwise(
        settings, name, version, manifest, backend, batching.max_batch_size
    )
    log.info(
        "model %s v%s verified: backend=%s device=%s golden_diff=%.3g invariance_diff=%.3g "
        "(batches of %s) bitwise_batch_invariant=%s (%s)",
        name,
        version,
        fmt,
        backend.device,
        report.golden_max_abs_diff,
        report.batch_invariance_max_diff,
        ", ".join(map(str, report.invariance_batch_sizes)),
        bits.invariant,
        bits.note,
    )
    _require_bitwise(settings, manifest, backend, bits)
    batch_ms = full_batch_ms(backend, manifest, batching.max_batch_size)
    parallel = choose_parallel_runs(
        settings,
        backend,
        lambda: load_backend(fmt, path, BackendOptions(settings.device, 1), signature),
        manifest,
        threads,
        cpus,
    )
    choice = BatchingChoice(
        batching.max_batch_size,
        batching.max_delay_ms,
        settings.adaptive_delay,
        batch_ms,
        batching.max_queue_rows,
        batching.queue_limit,
        threads,
        parallel.runs,
        parallel.reason,
    )
    drift = DriftMonitor.for_manifest(manifest, settings.drift_threshold, directory)
    release_freed()
    rss_after = rss_bytes()
    if rss_before is not None and rss_after is not None:
        learned.memory_bytes = max(0, rss_after - rss_before)
        log.info(
            "model %s v%s holds %.0f MiB (resident memory it added at load)",
            name,
            version,
            learned.memory_bytes / 2**20,
        )
    return Loaded(
        learned.fingerprint,
        manifest,
        backend,
        report,
        bits,
        choice,
        drift,
        parallel,
        learned.memory_bytes,
    )


def _measure_bitwise(
    settings: Settings, name: str, version: int, manifest: Manifest, backend: Backend, rows: int
) -> BitwiseMeasurement:
    """This runtime's bitwise batch invariance up to the row cap, when required or cheap."""
    required = settings.require_bitwise_invariance
    probes = golden_inputs(manifest)
    if required:
        log.info(
            "model %s v%s: measuring bitwise batch invariance up to %d rows (%s input values "
            "through the model), as require_bitwise_invariance asks",
            name,
            version,
            rows,
            f"{bitwise_cost(probes, rows):,}",
        )
    try:
        return measure_bitwise(backend, probes, rows, required=required)
    except Exception as exc:
        # Unrequired, a failed measurement is a figure missing, not a reason to refuse a model
        # whose tolerance checks passed; required, _require_bitwise refuses it.
        log.warning(
            "model %s v%s: bitwise measurement failed: %s", name, version, logged_message(exc)
        )
        return BitwiseMeasurement(None, rows, f"measurement failed: {public_message(exc)}")


def _require_bitwise(
    settings: Settings, manifest: Manifest, backend: Backend, bits: BitwiseMeasurement
) -> None:
    if not settings.require_bitwise_invariance or bits.invariant is True:
        return
    claim = manifest.verification
    recorded = (
        "the manifest records no measurement"
        if claim.bitwise_batch_invariant is None
        else f"the manifest records bitwise_batch_invariant={claim.bitwise_batch_invariant} "
        f"up to {claim.bitwise_max_rows} rows at export"
    )
    raise VerificationError(
        f"{setting_ref('require_bitwise_invariance', True)}, but on this runtime "
        f"({backend.format}, {backend.device}) up to {bits.max_rows} rows: {bits.note}; "
        f"{recorded}. Turn the setting off to serve it: its outputs then agree within the "
        "batch-invariance tolerance, not bit for bit"
    )
