"""The two types a model version has in the server: its record in the registry's table (whatever
its state), and, once it passed every check, the ready version requests are served by."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from service.admission import Admission
from service.backends import Backend
from service.batching import Batcher
from service.batching_policy import BatchingChoice
from service.drift import DriftMonitor
from service.loader import Learned
from service.packing import Signature
from service.store import Manifest
from service.telemetry import Figures


class Status(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"  # was ready; its batcher drained at shutdown
    UNLOADED = "unloaded"  # taken out of service (the management API, a rescan)


@dataclass(frozen=True, eq=False)
class ReadyVersion:
    """A verified version in service: every part a request needs, always there."""

    name: str
    version: int
    manifest: Manifest
    backend: Backend
    batcher: Batcher
    admission: Admission
    batching: BatchingChoice
    drift: DriftMonitor
    figures: Figures
    signature: Signature = field(init=False)  # the manifest's tensors, read on every request

    def __post_init__(self) -> None:
        object.__setattr__(self, "signature", Signature.of(self.manifest))  # frozen: set once


@dataclass(eq=False)
class VersionRecord:
    """One version in the registry's table: its state, why, and what loading learned."""

    name: str
    version: int
    figures: Figures
    status: Status = Status.LOADING
    reason: str | None = None
    learned: Learned = field(default_factory=Learned)
    ready: ReadyVersion | None = None  # set exactly while it serves (status READY)
