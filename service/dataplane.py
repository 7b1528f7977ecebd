"""The protocol-free dataplane: resolve a model version, validate rows, batch, time out, count.

Every protocol (``/predict`` today, KServe V2 next) parses its own body into a numpy array and
calls ``DataPlane.infer``; nothing here knows HTTP beyond the status code each error carries.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service.admission import Gate
from service.backends import Array
from service.errors import FoldserveError, InvalidInput, ModelNotReady, Overloaded, PayloadTooLarge
from service.metrics import Metrics
from service.registry import ModelVersion, Registry
from service.request_context import note_request
from service.shedding import ShedLog
from service.store import Manifest, TensorSpec

# float64 values below this round to a finite float32 (at most float32's max); at or above it, to
# infinity. float32's max itself, as numpy prints it (3.4028235e38), lies a bit above that max.
_FLOAT32_LIMIT = 2.0**128 - 2.0**103
_NUMERIC_KINDS = "fiu"  # floats and integers; bools, strings and objects are refused
T = TypeVar("T")
# NOTE: a request that would wait at the gate is refused at once only when its estimated wait
# passes twice its time left; otherwise it waits (no CPU: its body is unread) and is refused when
# its time runs out. Estimates made while the loop is saturated run high, and closed-loop
# clients retry a refusal at once: refusing on a pessimistic estimate starts a storm of cheap
# but not free refusals (measured: 218 good answers/s instead of 356 at 256 connections).
_HOPELESS = 2.0


@dataclass(frozen=True)
class InferenceResult:
    model: str
    version: int
    outputs: Array  # (n, *output shape), one row per input row
    manifest: Manifest

    def predictions(self) -> list[str] | list[int] | None:
        """For classifiers: the label (or index, without labels) of each row's arg-max."""
        if self.manifest.task != "classification" or not len(self.outputs):
            return None
        best = np.argmax(self.outputs.reshape(len(self.outputs), -1), axis=1)
        labels = self.manifest.labels
        if labels:
            return [labels[i] for i in best.tolist()]
        return [int(i) for i in best.tolist()]


def validate_rows(rows: np.ndarray, spec: TensorSpec) -> Array:
    """Check one request's array against the per-sample spec; accept nested or flat samples."""
    shape = spec.shape
    size = math.prod(shape)
    if rows.dtype.kind not in _NUMERIC_KINDS:
        raise InvalidInput(f"input {spec.name!r} must hold numbers only (got {_kind(rows)})")
    if rows.ndim == 0 or rows.shape[0] == 0:
        raise InvalidInput(f"input {spec.name!r} holds no samples: send at least one")
    n = rows.shape[0]
    if rows.shape[1:] == shape:
        pass
    elif rows.shape[1:] == (size,):
        rows = rows.reshape(n, *shape)
    else:
        expected = f"(n, {', '.join(map(str, shape))})"
        if len(shape) > 1:
            expected += f" or flat (n, {size})"
        raise InvalidInput(
            f"input {spec.name!r}: expected samples shaped {expected}, got {rows.shape}"
        )
    if rows.dtype == np.float32:
        if not np.isfinite(rows).all():
            raise _non_finite(spec)
        return rows
    # NOTE: a range check instead of np.errstate around the cast: entering errstate costs more
    # than the whole cast for a one-sample request. NaN fails the comparison too. Values in
    # range, and integers of any width, are finite once cast: no second check after the cast.
    if rows.dtype.kind == "f" and not np.abs(rows).max(initial=0.0) < _FLOAT32_LIMIT:
        raise _non_finite(spec)
    return rows.astype(np.float32)


def _non_finite(spec: TensorSpec) -> InvalidInput:
    return InvalidInput(
        f"input {spec.name!r} holds non-finite values (NaN, infinity or beyond float32 range)"
    )


def check_finite_outputs(outputs: Array) -> None:
    """A finite input can still overflow inside the model (e.g. 3e38 times a weight above 1).

    NaN or infinity then comes back, and its arg-max would be a confident-looking label. Rows are
    independent (the model is folded and verified batch invariant), so only the request whose
    rows overflowed is refused; its batch mates' outputs are their own and finite.
    """
    if np.isfinite(outputs).all():  # the usual case, in one pass: no per-row reduction
        return
    finite = np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise InvalidInput(
            "input is outside the range the model can compute: outputs are not finite "
            f"(NaN or infinity) for sample{'s' if len(bad) > 1 else ''} {shown}; "
            "send values of the scale the model was trained on"
        )


def admit(entry: ModelVersion, rows: int, deadline: float | None = None) -> None:
    """Refuse a request the queue can never hold (413), cannot hold now (503, Retry-After), or
    could not answer before ``deadline`` (the loop's clock; 503, Retry-After).

    NOTE: the batcher enforces the same bound; checked here first so that the message names the
    setting that sets it, which the batcher does not know. Nothing awaits between this check and
    the batcher's, so the queue cannot change in between.
    """
    if entry.batching is None or entry.batcher is None:
        raise ModelNotReady(f"model {entry.name!r} v{entry.version} is not serving")
    limit, why = entry.batching.max_queue_rows, entry.batching.queue_limit
    if rows > limit:
        # 413, not 503: this request can never fit, so a client retrying on 503 would loop.
        raise PayloadTooLarge(
            f"request has {rows} rows but at most {limit} can queue for model {entry.name!r} "
            f"v{entry.version} ({why}): send fewer rows per request or raise the limit"
        )
    waiting = entry.batcher.queue_rows
    if waiting + rows > limit:
        raise Overloaded(
            f"queue full for model {entry.name!r} v{entry.version}: {waiting} of {limit} rows "
            f"wait ({why}); retry shortly",
            model=entry.name,
            version=entry.version,
        )
    if deadline is not None:
        check_deadline(entry, rows, deadline)


def check_deadline(entry: ModelVersion, rows: int, deadline: float) -> None:
    """503 now for a request whose answer would come after its deadline: better than 504 later,
    and the batches it would have taken go to requests that can still be answered in time."""
    assert entry.batcher is not None
    wait = entry.batcher.estimated_wait(rows)
    left = deadline - asyncio.get_running_loop().time()
    if wait > left:
        raise _too_late(entry, wait, left)


def _too_late(entry: ModelVersion, wait: float, left: float) -> Overloaded:
    return Overloaded(
        f"model {entry.name!r} v{entry.version} would answer in about {wait * 1000:.0f} ms, "
        f"after the request's deadline ({max(left, 0.0) * 1000:.0f} ms left): refused now "
        "rather than answered too late; retry later or allow more time (X-Request-Timeout)",
        retry_after_s=max(1, math.ceil(wait)),
        reason="deadline",
        model=entry.name,
        version=entry.version,
    )


def _kind(rows: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes", "O": "mixed or missing values"}.get(
        rows.dtype.kind, str(rows.dtype)
    )


class DataPlane:
    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        request_timeout_s: float | None = None,
        shed_log: ShedLog | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.shed_log = shed_log or ShedLog()

    def deadline(self, requested_s: float | None, arrived: float | None = None) -> float | None:
        """The loop-clock time a request's answer is due: its own budget, capped by the server's,
        counted from ``arrived`` (the loop's clock; default now)."""
        budgets = [b for b in (requested_s, self.request_timeout_s) if b is not None]
        if not budgets:
            return None
        start = asyncio.get_running_loop().time() if arrived is None else arrived
        return start + min(budgets)

    async def enter(
        self, name: str | None, version: int | None, deadline: float | None
    ) -> Gate | None:
        """Pass the model version's gate before the body is read (see service.admission):
        at once while the queue has room, else in line with the body unread. Refused now (503)
        when not even one row could be answered before ``deadline``: reading and parsing a body
        costs more than the refusal, and under overload that work would take the CPU the
        admitted requests need.

        Returns the gate to ``leave()`` once the request is answered, or None when there is
        nothing to gate: an unknown model, or one not serving, is left to the full path, which
        reports it with the body's context.
        """
        try:
            entry = self.registry.resolve(name, version)
        except FoldserveError:
            return None
        batcher = entry.batcher
        if batcher is None:
            return None
        gate = batcher.gate
        if not gate.enter_now():
            left = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if left is not None:
                wait = max(batcher.estimated_wait(gate.rows_waiting()), gate.expected_wait())
                if wait > _HOPELESS * left:
                    raise _too_late(entry, wait, left)
            if not await gate.wait(left):
                raise _too_late(entry, batcher.estimated_wait(gate.rows_waiting()), 0.0)
        if deadline is not None:
            try:
                check_deadline(entry, 1, deadline)
            except Overloaded:
                gate.leave()
                raise
        return gate

    async def infer(
        self,
        name: str | None,
        version: int | None,
        rows: np.ndarray,
        encode: Callable[[InferenceResult], T],
        *,
        started: float | None = None,
        deadline: float | None = None,
    ) -> T:
        """Run one request and ``encode`` its result; ``started`` (perf_counter) lets the caller
        include its parsing time. Counted once, with the status the client will get: an
        encoding failure is a 500 like any other bug."""
        started = time.perf_counter() if started is None else started
        model, label = "", ""  # stay "" until resolved: unknown names must not become labels
        entry = None
        try:
            entry = self.registry.resolve(name, version)
            model, label = entry.name, str(entry.version)
            note_request(model, entry.version, rows)  # for the access log
            if entry.batcher is None or entry.manifest is None:
                raise ModelNotReady(f"model {entry.name!r} v{entry.version} is not serving")
            valid = validate_rows(rows, entry.manifest.inputs[0])
            self.metrics.observe_wait(entry.name, entry.version, entry.batcher.estimated_wait(1))
            admit(entry, len(valid), deadline)
            submitted = time.perf_counter()
            outputs = await entry.batcher.submit(valid, deadline)  # bounded by request_timeout_s
            returned = time.perf_counter()
            check_finite_outputs(outputs)
            answer = encode(InferenceResult(entry.name, entry.version, outputs, entry.manifest))
        except Exception as exc:
            status = exc.status if isinstance(exc, FoldserveError) else 500
            seconds = time.perf_counter() - started
            self.metrics.observe_request(model, label, status, seconds)
            if entry is not None:
                entry.stats.failed(seconds)
            if isinstance(exc, Overloaded):
                self._shed(exc, model, label)
            raise
        finished = time.perf_counter()
        self.metrics.observe_request(model, label, 200, finished - started)
        entry.stats.succeeded(
            len(valid), finished - started, submitted - started, finished - returned
        )
        entry.drift.observe(valid)  # answered rows only; folded in later, off this path
        return answer

    def reject(
        self, error: FoldserveError, started: float, entry: ModelVersion | None = None
    ) -> None:
        """Count a request refused before it reached ``infer`` (unreadable body, too large, or
        not what the resolved ``entry`` takes: then it is counted for that model version)."""
        model, label = ("", "") if entry is None else (entry.name, str(entry.version))
        if isinstance(error, Overloaded) and error.model is not None:
            model, label = error.model, str(error.version)
        note_request(model, label)  # for the access log
        seconds = time.perf_counter() - started
        self.metrics.observe_request(model, label, error.status, seconds)
        if entry is not None:
            entry.stats.failed(seconds)
        if isinstance(error, Overloaded):
            self._shed(error, model, label)

    def _shed(self, error: Overloaded, model: str, version: str) -> None:
        self.metrics.observe_shed(model, version, error.reason)
        self.shed_log.note(model, error.reason, error.message)
