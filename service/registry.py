"""The model registry: finds every version in the store, verifies it, and serves only what passed.

Each version is loaded on its own; a failure keeps that version out (with its reason in its
status) and never stops the others. Names resolve to the model's default version (see
``model_versions``) or its latest *ready* one.

The store can change while the server runs: ``rescan`` (on a timer, SIGHUP or the management
API) loads new versions, which take traffic only once they passed every check; retires versions
removed from the store (requests already on them finish there); and sends a version whose files
changed back through the checks, out of service until it passes. Every switch is one assignment
on the event loop, so a request sees the old set of versions or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from service.backends import Backend, BackendOptions, load_backend
from service.batching import Batcher
from service.drift import DriftMonitor
from service.errors import (
    ConfigError,
    FoldserveError,
    ModelNotFound,
    ModelNotReady,
    StoreError,
    VerificationError,
)
from service.metrics import Metrics
from service.preflight import torchscript_not_allowed
from service.settings import BatchingOverride, Settings, setting_ref
from service.stats import VersionStats
from service.store import (
    Fingerprint,
    Manifest,
    StoreView,
    check_inside,
    fingerprint,
    open_store,
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
_T = TypeVar("_T")


class Status(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"  # was ready; its batcher drained at shutdown
    UNLOADED = "unloaded"  # taken out of service through the management API


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: int
    status: Status = Status.LOADING
    reason: str | None = None
    manifest: Manifest | None = None
    backend: Backend | None = None
    report: VerificationReport | None = None
    bitwise: BitwiseMeasurement | None = None  # kept when it is why the version failed
    batcher: Batcher | None = None
    batching: BatchingChoice | None = None
    fingerprint: Fingerprint = ()  # the files as loaded: a rescan reloads a version that differs
    stats: VersionStats = field(default_factory=VersionStats)  # Triton's statistics extension
    drift: DriftMonitor = field(default_factory=lambda: DriftMonitor(None))  # set when loaded


@dataclass(frozen=True)
class BatchingChoice:
    """What the registry chose for one version's batcher, for /models and the logs."""

    max_batch_size: int
    max_delay_ms: float
    adaptive_delay: bool
    full_batch_ms: float  # measured at load; below inline_max_ms the model runs inline
    max_queue_rows: int  # max_queue_rows, or fewer when max_queue_bytes holds fewer samples
    queue_limit: str  # the setting that bounds the queue, named as an error message names it


@dataclass(frozen=True)
class _Plan:
    """A version's batching as settings and manifest decide it, before anything is timed."""

    max_batch_size: int
    max_delay_ms: float
    max_queue_rows: int
    queue_limit: str


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._models: dict[str, list[ModelVersion]] = {}  # versions ascending
        self._store = StoreView(settings.model_store)
        self._scanned = False
        self._unloaded: set[str] = set()  # models the management API took out of service
        self._rescan_lock = asyncio.Lock()

    def scan(self) -> None:
        """List what the store holds; every version starts out ``loading``."""
        root = self._settings.model_store
        if not root.is_dir():
            log.error("model store %s does not exist: nothing to serve (set --model-store)", root)
        try:
            self._store = open_store(root)
        except StoreError as exc:
            log.error("model store %s NOT served: %s", root, exc.message)
        if self._store.layout != "store":
            # KServe mounts one model (or one version) at /mnt/models: say what was understood.
            log.info(
                "model store %s is one %s's folder: serving it as model %r",
                root,
                self._store.layout,
                self._store.name,
            )
        for name in self._store.models():
            self._models[name] = [ModelVersion(name, v) for v in self._wanted(name)]
            for entry in self._models[name]:
                # Published at once: with --workers, a worker still loading keeps the pooled
                # foldserve_model_loaded (the minimum over live workers) at 0.
                self._metrics.set_loaded(name, entry.version, False)
        self._scanned = True
        unmatched = sorted(set(self._settings.model_batching) - set(self._models))
        if unmatched:
            log.warning(
                "model_batching has entries for %s that match no model in %s (models: %s); "
                "they apply to nothing: check the spelling",
                ", ".join(map(repr, unmatched)),
                root,
                ", ".join(self._models) or "none",
            )

    async def load_all(self) -> None:
        if not self._scanned:
            self.scan()
        try:
            # The default model first: readiness waits for it alone.
            for entry in sorted(self.entries(), key=lambda e: e.name != self.default_model):
                await self._load_one(entry)
        except BaseException as exc:
            # Cancelled at shutdown, or a bug in this loop: never leave a version "loading".
            cancelled = isinstance(exc, asyncio.CancelledError)
            why = "cancelled" if cancelled else _public(exc)
            for entry in self.entries():
                if entry.status is Status.LOADING:
                    self._fail(entry, f"loading was interrupted: {why}", None if cancelled else exc)
            raise

    async def _load_one(self, entry: ModelVersion) -> None:
        """Load, verify and start one version; any failure keeps this version out, alone."""
        try:
            # NOTE: hashing, session creation and verification block for a while: off the loop.
            backend, plan = await asyncio.to_thread(self._load, entry)
            if entry.manifest is not None:
                # NOTE: ready only once its batcher runs, and only on the loop: a load cancelled
                # at shutdown never leaves a "ready" version without a batcher behind.
                entry.backend = backend
                # Timed off the loop too: a full batch of a large model can take a while.
                batch_ms = await asyncio.to_thread(
                    _full_batch_ms, backend, entry.manifest, plan.max_batch_size
                )
                entry.batcher = self._make_batcher(entry, backend, plan, batch_ms)
                # Off the loop: reads (and hashes) the hidden layers' monitor maps.
                entry.drift = await asyncio.to_thread(
                    DriftMonitor.for_manifest,
                    entry.manifest,
                    self._settings.drift_threshold,
                    self._store.version_dir(entry.name, entry.version),
                )
                await entry.batcher.start()
                entry.status = Status.READY
        except Exception as exc:
            self._fail(entry, _public(exc), exc)
        self._publish(entry)

    def _fail(self, entry: ModelVersion, reason: str, exc: BaseException | None = None) -> None:
        """Keep ``entry`` out of service; ``reason`` is what /models and readiness show (a
        client may read them), the log gets the whole story."""
        entry.status, entry.reason = Status.FAILED, self._without_store_path(reason)
        backend = self._settings.backend
        logged = reason if exc is None else f"{reason} [{_logged(exc)}]"
        # A traceback only for what we did not foresee: the others say all in their message.
        trace = exc if exc is not None and not isinstance(exc, FoldserveError | OSError) else None
        log.error(
            "model %s v%s (%s) NOT served: %s",
            entry.name,
            entry.version,
            backend,
            logged,
            exc_info=trace,
        )
        self._publish(entry)

    def _without_store_path(self, text: str) -> str:
        """``text`` with the store's own location cut from the paths it names: a reason names
        ``digits-mlp/1/manifest.json``, never where the store lies on the server."""
        root = self._settings.model_store
        # Absolute forms only: a relative one ("model_store", ".") names no server path, and
        # replacing "." would mangle every sentence.
        forms = {str(root.resolve()), str(root.absolute())} - {"/"}
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form + "/", "").replace(form, "the model store")
        return text

    def _publish(self, entry: ModelVersion) -> None:
        # NOTE: a metrics bug must never fail a model or stop the others from loading.
        try:
            self._metrics.set_loaded(entry.name, entry.version, entry.status is Status.READY)
        except Exception:
            log.exception("metrics failed for model %s v%s", entry.name, entry.version)

    async def stop(self) -> None:
        """Stop every batcher; each answers all the requests it accepted first."""
        for entry in self.entries():
            if entry.batcher is not None:
                await entry.batcher.stop()
                if entry.status is Status.READY:  # a failed version keeps its reason
                    entry.status = Status.STOPPED
                self._publish(entry)

    # -- the store changing under a running server

    def _wanted(self, name: str) -> list[int]:
        """The versions of ``name`` the store holds and its policy serves."""
        available = self._store.versions(name)
        policy = self._settings.model_versions.get(name)
        return available if policy is None else policy.wanted(available)

    async def rescan(self, only: str | None = None) -> None:
        """Bring the served versions in line with the store (one rescan at a time)."""
        async with self._rescan_lock:
            try:
                self._store = await asyncio.to_thread(open_store, self._settings.model_store)
            except StoreError as exc:
                log.error("rescan: model store %s NOT read: %s", self._settings.model_store, exc)
                return
            names = set(self._store.models()) | set(self._models)
            for name in sorted(names if only is None else {only}):
                if name not in self._unloaded:
                    await self._rescan_model(name)

    async def _rescan_model(self, name: str) -> None:
        wanted = set(await asyncio.to_thread(self._wanted, name))
        current = {entry.version: entry for entry in self._models.get(name, [])}
        for version, entry in current.items():
            if version not in wanted:
                await self._retire(entry, "removed from the store (or by its version policy)")
        changed = []
        for version, entry in current.items():
            if version in wanted and entry.fingerprint != await asyncio.to_thread(
                fingerprint, self._store.version_dir(name, version)
            ):
                changed.append(entry)
        for entry in changed:
            # Out of service first: traffic goes to the other ready versions while it is
            # checked again, and comes back only if it passes.
            await self._retire(entry, "its files changed on disk; checking it again")
        added = [ModelVersion(name, v) for v in sorted(wanted - set(current))]
        added += [ModelVersion(name, entry.version) for entry in changed]
        for entry in added:
            self._metrics.set_loaded(name, entry.version, False)
            log.info("rescan: loading model %s v%s", name, entry.version)
            self._swap_in(entry)
            await self._load_one(entry)

    def _swap_in(self, entry: ModelVersion) -> None:
        """Put ``entry`` (still loading: not resolved to until ready) in its model's list: a new
        list in one assignment, so ``resolve`` sees either list whole."""
        versions = [e for e in self._models.get(entry.name, []) if e.version != entry.version]
        self._models[entry.name] = sorted([*versions, entry], key=lambda e: e.version)

    async def _retire(self, entry: ModelVersion, why: str) -> None:
        """Take a version out of service; the requests it accepted are answered first."""
        versions = [e for e in self._models.get(entry.name, []) if e is not entry]
        if versions:
            self._models[entry.name] = versions
        else:
            self._models.pop(entry.name, None)
        log.info("model %s v%s out of service: %s", entry.name, entry.version, why)
        if entry.batcher is not None:
            await entry.batcher.stop(timeout_s=self._settings.request_timeout_s)
        entry.status, entry.reason = Status.UNLOADED, why
        self._metrics.set_loaded(entry.name, entry.version, False)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name`` until ``load`` (management API)."""
        async with self._rescan_lock:
            if name not in self._models:
                raise ModelNotFound(f"model {name!r} is not loaded; loaded: {sorted(self._models)}")
            self._unloaded.add(name)
            for entry in list(self._models[name]):
                await self._retire(entry, "unloaded through the management API")

    async def load(self, name: str) -> None:
        """(Re)load ``name`` from the store: new versions, changed files (management API)."""
        self._unloaded.discard(name)
        await self.rescan(only=name)
        if not self._models.get(name):
            raise ModelNotFound(f"model {name!r} has no version in the model store to load")

    def index(self) -> list[dict[str, object]]:
        """Every version the store holds or the server serves, Triton's repository index."""
        rows: dict[tuple[str, int], dict[str, object]] = {}
        for name in self._store.models():
            for version in self._store.versions(name):
                rows[(name, version)] = {
                    "name": name,
                    "version": str(version),
                    "state": "UNAVAILABLE",
                    "reason": "not loaded",
                }
        for entry in self.entries():
            state = {Status.READY: "READY", Status.LOADING: "LOADING"}.get(
                entry.status, "UNAVAILABLE"
            )
            rows[(entry.name, entry.version)] = {
                "name": entry.name,
                "version": str(entry.version),
                "state": state,
                "reason": entry.reason or "",
            }
        return [rows[key] for key in sorted(rows)]

    @property
    def default_model(self) -> str:
        return self._settings.default_model

    def entries(self) -> list[ModelVersion]:
        return [entry for versions in self._models.values() for entry in versions]

    def resolve(self, name: str | None, version: int | None) -> ModelVersion:
        """The ready version asked for; ``None`` means the default model, and its default version
        (``model_versions``) or else its latest ready one."""
        name = self._settings.default_model if name is None else name
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found; available: {sorted(self._models)}")
        if version is None:
            policy = self._settings.model_versions.get(name)
            if policy is not None and policy.default is not None:
                version = policy.default
        if version is None:
            ready = [e for e in versions if e.status is Status.READY]
            if ready:
                return ready[-1]
            raise ModelNotReady(f"model {name!r} has no ready version: {_reasons(versions)}")
        entry = next((e for e in versions if e.version == version), None)
        if entry is None:
            known = [e.version for e in versions]
            raise ModelNotFound(f"model {name!r} has no version {version}; versions: {known}")
        if entry.status is not Status.READY:
            raise ModelNotReady(f"model {name!r} {_reasons([entry])}")
        return entry

    def readiness(self) -> tuple[bool, str]:
        """Ready when the default model has a verified version; otherwise say why not."""
        try:
            entry = self.resolve(None, None)
        except FoldserveError as exc:
            return False, exc.message
        return True, f"default model {entry.name!r} version {entry.version} is ready"

    def _load(self, entry: ModelVersion) -> tuple[Backend, _Plan]:
        """Read, check and verify one version (in a worker thread); raises on any failure."""
        fmt = self._settings.backend
        directory = self._store.version_dir(entry.name, entry.version)
        check_inside(self._settings.model_store, directory)
        entry.fingerprint = fingerprint(directory)
        manifest = entry.manifest = read_manifest(directory)
        if (manifest.name, manifest.version) != (entry.name, entry.version):
            raise VerificationError(
                f"manifest says {manifest.name!r} v{manifest.version}, folder is "
                f"{entry.name}/{entry.version}"
            )
        if fmt == "torchscript" and not self._settings.allow_torchscript:
            raise ConfigError(torchscript_not_allowed())
        model_file = manifest.file(fmt)
        if model_file is None:
            have = [f.format for f in manifest.files]
            raise VerificationError(f"manifest has no {fmt} file (has {have}); set --backend")
        plan = self._plan(entry, manifest)  # a setting that cannot work fails before the checks
        for model_file_entry in manifest.checked_files():
            check_inside(self._settings.model_store, directory / model_file_entry.path)
        check_files(directory, manifest)
        options = BackendOptions(self._settings.device, self._settings.intra_op_threads)
        backend = load_backend(fmt, directory / model_file.path, options)
        entry.report = verify_loaded_model(manifest, backend, plan.max_batch_size)
        entry.bitwise = self._measure_bitwise(entry, manifest, backend, plan.max_batch_size)
        log.info(
            "model %s v%s verified: backend=%s device=%s golden_diff=%.3g invariance_diff=%.3g "
            "(batches of %s) bitwise_batch_invariant=%s (%s)",
            entry.name,
            entry.version,
            fmt,
            backend.device,
            entry.report.golden_max_abs_diff,
            entry.report.batch_invariance_max_diff,
            ", ".join(map(str, entry.report.invariance_batch_sizes)),
            entry.bitwise.invariant,
            entry.bitwise.note,
        )
        self._require_bitwise(entry, manifest, backend, entry.bitwise)
        return backend, plan

    def _measure_bitwise(
        self, entry: ModelVersion, manifest: Manifest, backend: Backend, max_rows: int
    ) -> BitwiseMeasurement:
        """This runtime's bitwise batch invariance up to the row cap, when required or cheap."""
        required = self._settings.require_bitwise_invariance
        probes = golden_inputs(manifest)
        if required:
            log.info(
                "model %s v%s: measuring bitwise batch invariance up to %d rows (%s input "
                "values through the model), as require_bitwise_invariance asks",
                entry.name,
                entry.version,
                max_rows,
                f"{bitwise_cost(probes, max_rows):,}",
            )
        try:
            return measure_bitwise(backend, probes, max_rows, required=required)
        except Exception as exc:
            # Unrequired, a failed measurement is a figure missing, not a reason to refuse a
            # model whose tolerance checks passed; required, _require_bitwise refuses it.
            log.warning(
                "model %s v%s: bitwise measurement failed: %s",
                entry.name,
                entry.version,
                _logged(exc),
            )
            return BitwiseMeasurement(None, max_rows, f"measurement failed: {_public(exc)}")

    def _require_bitwise(
        self, entry: ModelVersion, manifest: Manifest, backend: Backend, bits: BitwiseMeasurement
    ) -> None:
        if not self._settings.require_bitwise_invariance or bits.invariant is True:
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

    def _plan(self, entry: ModelVersion, manifest: Manifest) -> _Plan:
        """Row cap and delay (a per-model override beats the global one, then the manifest) and
        the queue bound (the lower of max_queue_rows and what max_queue_bytes holds)."""
        s, m = self._settings, manifest.batching
        own = s.model_batching.get(entry.name, BatchingOverride())
        cap = _first(own.max_batch_size, s.max_batch_size, m.max_batch_size)
        delay = _first(own.max_delay_ms, s.max_delay_ms, m.max_delay_ms)
        # NOTE: the batcher queues validated rows, which are float32.
        sample_bytes = 4 * math.prod(manifest.inputs[0].shape)
        by_bytes = s.max_queue_bytes // sample_bytes
        bytes_limit = setting_ref("max_queue_bytes", s.max_queue_bytes)
        if by_bytes < 1:
            raise ConfigError(
                f"{bytes_limit} cannot hold one sample of this model ({sample_bytes} bytes of "
                f"float32 input): raise it to at least {sample_bytes}"
            )
        if by_bytes < s.max_queue_rows:
            rows, limit = by_bytes, f"{bytes_limit}, {sample_bytes} bytes per sample"
        else:
            rows, limit = s.max_queue_rows, setting_ref("max_queue_rows", s.max_queue_rows)
        if rows < cap:
            log.warning(
                "model %s v%s: at most %d rows can queue (%s), fewer than max_batch_size=%d: "
                "batches will not fill",
                entry.name,
                entry.version,
                rows,
                limit,
                cap,
            )
        return _Plan(cap, delay, rows, limit)

    def _make_batcher(
        self, entry: ModelVersion, backend: Backend, plan: _Plan, full_batch_ms: float
    ) -> Batcher:
        s = self._settings
        cap, delay = plan.max_batch_size, plan.max_delay_ms
        inline = full_batch_ms < s.inline_max_ms
        entry.batching = BatchingChoice(
            cap, delay, s.adaptive_delay, full_batch_ms, plan.max_queue_rows, plan.queue_limit
        )
        log.info(
            "model %s v%s batching: max_batch_size=%d max_delay_ms=%g adaptive_delay=%s "
            "full batch %.3f ms, so %s; at most %d rows queue (%s)",
            entry.name,
            entry.version,
            cap,
            delay,
            s.adaptive_delay,
            full_batch_ms,
            "inline on the event loop" if inline else "in a worker thread",
            plan.max_queue_rows,
            plan.queue_limit,
        )
        self._metrics.mirror_stages(entry.name, entry.version, entry.stats)
        return Batcher(
            backend.run,
            max_batch_size=cap,
            max_delay_ms=delay,
            max_queue_rows=plan.max_queue_rows,
            observer=self._metrics.observer(entry.name, entry.version),
            adaptive_delay=s.adaptive_delay,
            inline=inline,
            # Demoted to a worker thread if it later runs 4x slower than the budget it met.
            inline_limit_ms=4 * s.inline_max_ms,
            timeout_s=s.request_timeout_s,
            # What admission by deadline assumes a batch takes until batches are measured.
            initial_batch_s=full_batch_ms / 1000,
            stats=entry.stats,
        )


_TIMING_RUNS = 7
_TIMING_BUDGET_S = 1.0


def _full_batch_ms(backend: Backend, manifest: Manifest, rows: int) -> float:
    """Median of a few warm runs of one full batch (golden inputs repeated).

    The median, not the best: the decision to block the event loop should not rest on luck.
    Seven runs, or fewer once they took a second: the time only decides whether a model is fast
    enough (inline_max_ms, under a millisecond) to run on the event loop, and a batch of large
    images that takes seconds has answered that in one run.
    """
    golden = golden_inputs(manifest)
    batch = np.ascontiguousarray(np.resize(golden, (rows, *golden.shape[1:])))
    backend.run(batch)  # warm-up: first runs allocate
    times: list[float] = []
    while len(times) < _TIMING_RUNS and sum(times) < _TIMING_BUDGET_S:
        started = time.perf_counter()
        backend.run(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def _first(*values: _T | None) -> _T:
    """The first value that is set; the last one (the manifest's) always is."""
    return next(v for v in values if v is not None)


def _public(exc: BaseException) -> str:
    """A failure as a client may read it (/models, readiness): our errors' messages, which name
    no server path; for anything else only its kind, since its text may name paths or library
    internals. The log gets ``_logged``."""
    if isinstance(exc, FoldserveError):
        return exc.message
    if isinstance(exc, OSError):
        name = Path(os.fsdecode(exc.filename)).name if exc.filename else "a file"
        return f"cannot read {name}: {exc.strerror or type(exc).__name__}"
    return "unexpected error (details in the server log)"


def _logged(exc: BaseException) -> str:
    return exc.logged() if isinstance(exc, FoldserveError) else f"{type(exc).__name__}: {exc}"


def _reasons(versions: list[ModelVersion]) -> str:
    return "; ".join(
        f"v{e.version} {e.status}" + (f": {e.reason}" if e.reason else "") for e in versions
    )
