"""The model registry: finds every version in the store, verifies it, and serves only what passed.

Each version is loaded on its own; a failure keeps that version out (with its reason in its
status) and never stops the others. Names resolve to the latest *ready* version.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass

from service.backends import Backend, BackendOptions, load_backend
from service.batching import Batcher
from service.errors import FoldserveError, ModelNotFound, ModelNotReady, VerificationError
from service.metrics import Metrics
from service.settings import Settings
from service.store import Manifest, list_models, list_versions, read_manifest, version_dir
from service.verify import VerificationReport, check_files, verify_loaded_model

log = logging.getLogger(__name__)


class Status(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"  # was ready; its batcher drained at shutdown


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: int
    status: Status = Status.LOADING
    reason: str | None = None
    manifest: Manifest | None = None
    backend: Backend | None = None
    report: VerificationReport | None = None
    batcher: Batcher | None = None


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._models: dict[str, list[ModelVersion]] = {}  # versions ascending
        self._scanned = False

    def scan(self) -> None:
        """List what the store holds; every version starts out ``loading``."""
        root = self._settings.model_store
        if not root.is_dir():
            log.error("model store %s does not exist: nothing to serve (set --model-store)", root)
        for name in list_models(root):
            self._models[name] = [ModelVersion(name, v) for v in list_versions(root, name)]
        self._scanned = True

    async def load_all(self) -> None:
        if not self._scanned:
            self.scan()
        # The default model first: readiness waits for it alone.
        for entry in sorted(self.entries(), key=lambda e: e.name != self.default_model):
            # NOTE: hashing, session creation and verification block for a while: off the loop.
            backend = await asyncio.to_thread(self._load, entry)
            if backend is not None and entry.manifest is not None:
                # NOTE: ready only once its batcher runs, and only on the loop: a load cancelled
                # at shutdown never leaves a "ready" version without a batcher behind.
                entry.backend = backend
                entry.batcher = self._make_batcher(entry, entry.manifest, backend)
                await entry.batcher.start()
                entry.status = Status.READY
            self._metrics.set_loaded(entry.name, entry.version, entry.status is Status.READY)

    async def stop(self) -> None:
        """Stop every batcher; each answers all the requests it accepted first."""
        for entry in self.entries():
            if entry.batcher is not None:
                await entry.batcher.stop()
                entry.status = Status.STOPPED
                self._metrics.set_loaded(entry.name, entry.version, False)

    @property
    def default_model(self) -> str:
        return self._settings.default_model

    def entries(self) -> list[ModelVersion]:
        return [entry for versions in self._models.values() for entry in versions]

    def resolve(self, name: str | None, version: int | None) -> ModelVersion:
        """The ready version asked for; ``None`` means the default model or its latest ready one."""
        name = self._settings.default_model if name is None else name
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} not found; available: {sorted(self._models)}")
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

    def _load(self, entry: ModelVersion) -> Backend | None:
        fmt = self._settings.backend
        directory = version_dir(self._settings.model_store, entry.name, entry.version)
        try:
            manifest = entry.manifest = read_manifest(directory)
            if (manifest.name, manifest.version) != (entry.name, entry.version):
                raise VerificationError(
                    f"manifest says {manifest.name!r} v{manifest.version}, folder is "
                    f"{entry.name}/{entry.version}"
                )
            model_file = manifest.file(fmt)
            if model_file is None:
                have = [f.format for f in manifest.files]
                raise VerificationError(f"manifest has no {fmt} file (has {have}); set --backend")
            check_files(directory, manifest)
            options = BackendOptions(self._settings.device, self._settings.intra_op_threads)
            backend = load_backend(fmt, directory / model_file.path, options)
            entry.report = verify_loaded_model(directory, manifest, backend)
        except Exception as exc:  # any failure keeps only this version out
            reason = str(exc) if isinstance(exc, FoldserveError) else f"{type(exc).__name__}: {exc}"
            entry.status, entry.reason = Status.FAILED, reason
            log.error("model %s v%s (%s) NOT served: %s", entry.name, entry.version, fmt, reason)
            return None
        log.info(
            "model %s v%s verified: backend=%s device=%s golden_diff=%.3g invariance_diff=%.3g",
            entry.name,
            entry.version,
            fmt,
            backend.device,
            entry.report.golden_max_abs_diff,
            entry.report.batch_invariance_max_diff,
        )
        return backend

    def _make_batcher(self, entry: ModelVersion, manifest: Manifest, backend: Backend) -> Batcher:
        s, m = self._settings, manifest.batching
        return Batcher(
            backend.run,
            max_batch_size=m.max_batch_size if s.max_batch_size is None else s.max_batch_size,
            max_delay_ms=m.max_delay_ms if s.max_delay_ms is None else s.max_delay_ms,
            max_queue_rows=s.max_queue_rows,
            observer=self._metrics.observer(entry.name, entry.version),
        )


def _reasons(versions: list[ModelVersion]) -> str:
    return "; ".join(
        f"v{e.version} {e.status}" + (f": {e.reason}" if e.reason else "") for e in versions
    )
