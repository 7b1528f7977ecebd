"""The model registry: the table of every version in the store, and the one place requests
resolve a model and version to the ready version that serves them.

Each version is loaded on its own (``service.loader``, in a thread); a failure keeps that version
out (with its reason in its record) and never stops the others. Names resolve to the model's
default version (see ``model_versions``) or its latest *ready* one.

The store can change while the server runs: ``rescan`` (on a timer, SIGHUP or the management
API) loads new versions, which take traffic only once they passed every check; retires versions
removed from the store (requests already on them finish there); and sends a version whose files
changed back through the checks, out of service until it passes. Every switch is one assignment
on the event loop, so a request sees the old set of versions or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import logging

from service.admission import Admission
from service.batching import Batcher
from service.cpus import usable_cpus
from service.errors import (
    FoldserveError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    StoreError,
    logged_message,
    public_message,
)
from service.loader import Loaded, LoadFailed, load_version
from service.settings import Settings
from service.store import StoreView, fingerprint, is_model_name, open_store
from service.telemetry import Telemetry
from service.threads import in_daemon_thread
from service.versions import ReadyVersion, Status, VersionRecord

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, settings: Settings, telemetry: Telemetry) -> None:
        self._settings = settings
        self._telemetry = telemetry
        self._models: dict[str, list[VersionRecord]] = {}  # versions ascending
        self._store = StoreView(settings.model_store)
        self._alias: str | None = None  # the store's only model, answering as default_model
        self._scanned = False
        self._unloaded: set[str] = set()  # models the management API took out of service
        self._rescan_lock = asyncio.Lock()
        self._cpus = usable_cpus()

    # -- resolving: the request path's one lookup

    def resolve(self, name: str | None, version: int | None) -> ReadyVersion:
        """The ready version asked for; ``None`` means the default model, and its default
        version (``model_versions``) or else its latest ready one."""
        asked, name = name, self._settings.default_model if name is None else name
        if self._alias is not None and name == self._settings.default_model:
            name = self._alias
        versions = self._models.get(name)
        if not versions and asked is None:
            # NOTE: a request that names no model asked for the server's own: that it is not
            # loaded now (unloaded, or not in the store yet) is the server's state, not the
            # client's mistake, so 503 with Retry-After (a 404 tells clients not to retry).
            raise ModelNotReady(
                f"the default model {_shown(name)} is not loaded (unloaded, or not in the store "
                f"yet); loaded: {sorted(self._models)}"
            )
        if not versions:
            raise ModelNotFound(
                f"model {_shown(name)} not found; available: {sorted(self._models)}"
            )
        if version is None:
            policy = self._settings.model_versions.get(name)
            if policy is not None and policy.default is not None:
                version = policy.default
        if version is None:
            for record in reversed(versions):
                if record.ready is not None:
                    return record.ready
            raise ModelNotReady(f"model {name!r} has no ready version: {_reasons(versions)}")
        found = next((r for r in versions if r.version == version), None)
        if found is None:
            known = [r.version for r in versions]
            raise ModelNotFound(f"model {name!r} has no version {version}; versions: {known}")
        if found.ready is None:
            raise ModelNotReady(f"model {name!r} {_reasons([found])}")
        return found.ready

    def readiness(self) -> tuple[bool, str]:
        """Ready when the default model has a verified version; otherwise say why not."""
        try:
            ready = self.resolve(None, None)
        except FoldserveError as exc:
            return False, exc.message
        return True, f"default model {ready.name!r} version {ready.version} is ready"

    @property
    def default_model(self) -> str:
        return self._settings.default_model

    def entries(self) -> list[VersionRecord]:
        return [record for versions in self._models.values() for record in versions]

    def ready_versions(self) -> list[ReadyVersion]:
        return [r.ready for r in self.entries() if r.ready is not None]

    # -- loading

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
            self._models[name] = [self._record(name, v) for v in self._wanted(name)]
        self._name_the_default()
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

    def _name_the_default(self) -> None:
        """A store of one model serves it as default_model too, whatever its manifest calls
        it: KServe names the model after the InferenceService (``/v2/models/<isvc>/infer``)."""
        asked = self._settings.default_model
        answering = self._store.answering_for(asked)
        alias = answering if answering not in (None, asked) else None
        if alias is not None and alias != self._alias:
            log.info("model %r (the store's only model) answers as %r too", alias, asked)
        self._alias = alias

    @property
    def aliases(self) -> dict[str, str]:
        """Names that are not a model's own, and the model each one means."""
        return {} if self._alias is None else {self._settings.default_model: self._alias}

    def _record(self, name: str, version: int) -> VersionRecord:
        record = VersionRecord(name, version, self._telemetry.version(name, version))
        # Published at once: with --workers, a worker still loading keeps the pooled
        # foldserve_model_loaded (the minimum over live workers) at 0.
        record.figures.loaded(False)
        record.figures.memory(0)
        return record

    async def load_all(self) -> None:
        if not self._scanned:
            self.scan()
        try:
            # The default model first: readiness waits for it alone.
            for record in sorted(self.entries(), key=lambda r: r.name != self.default_model):
                await self._load_one(record)
        except BaseException as exc:
            # Cancelled at shutdown, or a bug in this loop: never leave a version "loading".
            cancelled = isinstance(exc, asyncio.CancelledError)
            why = "cancelled" if cancelled else public_message(exc)
            for record in self.entries():
                if record.status is Status.LOADING:
                    self._fail(
                        record, f"loading was interrupted: {why}", None if cancelled else exc
                    )
            raise

    async def _load_one(self, record: VersionRecord) -> None:
        """Load, verify and start one version; any failure keeps this version out, alone."""
        directory = self._store.version_dir(record.name, record.version)
        try:
            loaded = await in_daemon_thread(
                load_version, self._settings, directory, record.name, record.version, self._cpus
            )
        except LoadFailed as failed:
            record.learned = failed.learned
            self._fail(record, public_message(failed.cause), failed.cause)
            return
        record.learned.fingerprint = loaded.fingerprint
        record.learned.manifest = loaded.manifest
        record.learned.report = loaded.report
        record.learned.bitwise = loaded.bitwise
        record.learned.backend = loaded.backend
        record.learned.memory_bytes = loaded.memory_bytes
        try:
            ready = self._serve(record, loaded)
            await ready.batcher.start()
        except Exception as exc:
            self._fail(record, public_message(exc), exc)
            return
        # NOTE: ready only once its batcher runs, and only on the loop: a load cancelled at
        # shutdown never leaves a "ready" version without a batcher behind.
        record.ready, record.status = ready, Status.READY
        record.figures.loaded(True)
        record.figures.memory(loaded.memory_bytes or 0)

    def _serve(self, record: VersionRecord, loaded: Loaded) -> ReadyVersion:
        s, choice = self._settings, loaded.batching
        inline = choice.inline(s)
        log.info(
            "model %s v%s batching: max_batch_size=%d max_delay_ms=%g adaptive_delay=%s "
            "full batch %.3f ms, so %s%s; at most %d rows queue (%s)",
            record.name,
            record.version,
            choice.max_batch_size,
            choice.max_delay_ms,
            choice.adaptive_delay,
            choice.full_batch_ms,
            "inline on the event loop" if inline else "in a worker thread",
            ""
            if choice.parallel_runs == 1
            else f", batches of 2 rows or more in {choice.parallel_runs} one-thread runs at once",
            choice.max_queue_rows,
            choice.queue_limit,
        )
        batcher = Batcher(
            loaded.backend.run,
            max_batch_size=choice.max_batch_size,
            max_delay_ms=choice.max_delay_ms,
            adaptive_delay=choice.adaptive_delay,
            inline=inline,
            # Demoted to a worker thread if it later runs 4x slower than the budget it met.
            inline_limit_ms=4 * s.inline_max_ms,
            timeout_s=s.request_timeout_s,
            # What admission by deadline assumes a batch takes until batches are measured.
            initial_batch_s=choice.full_batch_ms / 1000,
            stats=record.figures,
            parallel_run=loaded.parallel.run,
            parallel_runs=loaded.parallel.runs,
        )
        admission = Admission(
            record.name, record.version, batcher, choice.max_queue_rows, choice.queue_limit
        )
        return ReadyVersion(
            record.name,
            record.version,
            loaded.manifest,
            loaded.backend,
            batcher,
            admission,
            choice,
            loaded.drift,
            record.figures,
        )

    def _fail(self, record: VersionRecord, reason: str, exc: BaseException | None = None) -> None:
        """Keep ``record`` out of service; ``reason`` is what /models and readiness show (a
        client may read them), the log gets the whole story."""
        record.status, record.reason = Status.FAILED, self._without_store_path(reason)
        record.ready = None
        record.figures.loaded(False)
        record.figures.memory(0)
        logged = reason if exc is None else f"{reason} [{logged_message(exc)}]"
        # A traceback only for what we did not foresee: the others say all in their message.
        trace = exc if exc is not None and not isinstance(exc, FoldserveError | OSError) else None
        log.error(
            "model %s v%s (%s) NOT served: %s",
            record.name,
            record.version,
            self._settings.backend,
            logged,
            exc_info=trace,
        )

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

    async def stop(self) -> None:
        """Stop every batcher; each answers all the requests it accepted first."""
        for record in self.entries():
            ready = record.ready
            if ready is not None:
                await ready.batcher.stop()
                _close(ready)
                record.status, record.ready = Status.STOPPED, None
                record.figures.loaded(False)
                record.figures.memory(0)

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
            self._name_the_default()
            names = set(self._store.models()) | set(self._models)
            for name in sorted(names if only is None else {only}):
                if name not in self._unloaded:
                    await self._rescan_model(name)

    async def _rescan_model(self, name: str) -> None:
        wanted = set(await asyncio.to_thread(self._wanted, name))
        current = {record.version: record for record in self._models.get(name, [])}
        for version, record in current.items():
            if version not in wanted:
                await self._retire(record, "removed from the store (or by its version policy)")
        changed = []
        for version, record in current.items():
            if version in wanted and record.learned.fingerprint != await asyncio.to_thread(
                fingerprint, self._store.version_dir(name, version)
            ):
                changed.append(record)
        for record in changed:
            # Out of service first: traffic goes to the other ready versions while it is
            # checked again, and comes back only if it passes.
            await self._retire(record, "its files changed on disk; checking it again")
        added = [self._record(name, v) for v in sorted(wanted - set(current))]
        added += [self._record(name, record.version) for record in changed]
        for record in added:
            log.info("rescan: loading model %s v%s", name, record.version)
            self._swap_in(record)
            await self._load_one(record)

    def _swap_in(self, record: VersionRecord) -> None:
        """Put ``record`` (still loading: not resolved to until ready) in its model's list: a new
        list in one assignment, so ``resolve`` sees either list whole."""
        versions = [r for r in self._models.get(record.name, []) if r.version != record.version]
        self._models[record.name] = sorted([*versions, record], key=lambda r: r.version)

    async def _retire(self, record: VersionRecord, why: str) -> None:
        """Take a version out of service; the requests it accepted are answered first."""
        versions = [r for r in self._models.get(record.name, []) if r is not record]
        if versions:
            self._models[record.name] = versions
        else:
            self._models.pop(record.name, None)
        log.info("model %s v%s out of service: %s", record.name, record.version, why)
        ready, record.ready = record.ready, None
        record.status, record.reason = Status.UNLOADED, why
        record.figures.loaded(False)
        record.figures.memory(0)
        if ready is not None:
            await ready.batcher.stop(timeout_s=self._settings.request_timeout_s)
            _close(ready)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name`` until ``load`` (management API)."""
        _check_name(name)
        async with self._rescan_lock:
            if name not in self._models:
                raise ModelNotFound(
                    f"model {_shown(name)} is not loaded; loaded: {sorted(self._models)}"
                )
            self._unloaded.add(name)
            for record in list(self._models[name]):
                await self._retire(record, "unloaded through the management API")

    async def load(self, name: str) -> None:
        """(Re)load ``name`` from the store: new versions, changed files (management API)."""
        _check_name(name)  # before anything touches the disk with a name a client chose
        self._unloaded.discard(name)
        await self.rescan(only=name)
        if not self._models.get(name):
            raise ModelNotFound(f"model {_shown(name)} has no version in the model store to load")

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
        for record in self.entries():
            state = {Status.READY: "READY", Status.LOADING: "LOADING"}.get(
                record.status, "UNAVAILABLE"
            )
            rows[(record.name, record.version)] = {
                "name": record.name,
                "version": str(record.version),
                "state": state,
                "reason": record.reason or "",
            }
        return [rows[key] for key in sorted(rows)]


def _close(ready: ReadyVersion) -> None:
    close = getattr(ready.drift, "close", None)
    if close is not None:
        close()


def _check_name(name: str) -> None:
    if not is_model_name(name):
        raise InvalidInput(
            f"{_shown(name)} is not a model name: model names are lowercase letters, digits, "
            "'.', '_' or '-' (at most 64 characters, starting with a letter or digit)"
        )


def _shown(name: str) -> str:
    """A model name a client sent, as a message quotes it: cut short, never echoed whole."""
    return repr(name) if len(name) <= 64 else f"{name[:60]!r}... ({len(name)} characters)"


def _reasons(versions: list[VersionRecord]) -> str:
    return "; ".join(
        f"v{r.version} {r.status}" + (f": {r.reason}" if r.reason else "") for r in versions
    )
