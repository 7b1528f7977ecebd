"""The request path: one inference request from its head to its answer, each step once, cheapest
refusal first.

    key (401) -> body form (415) -> time budget (400) -> resolve the version, once (404, 503)
    -> admission before the body (503; or wait, body unread) -> read the body within its limits
    (413, 408, 503) -> parse (400) -> validate rows (400) -> admit the rows (413, 503)
    -> batch (504, 500) -> outputs finite (400) -> encode -> count, once

Protocols differ only in their ``Codec`` (service.routes.predict, service.routes.v2): how the
body is read and parsed, and how the answer is written. Nothing here knows HTTP beyond the status
code each error carries and the Request the server hands over.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.admission import Ticket
from service.backends import Array
from service.errors import (
    FoldserveError,
    InferenceTimeout,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.finite import all_finite, within_float32
from service.http.request import Request
from service.http.response import Response, failure
from service.images import EncodedImages, ImageDecoder
from service.keys import Keys
from service.packing import Packing
from service.registry import Registry
from service.repeated_log import RepeatedLog
from service.request_body import BodyLimit, body_decoder, read_body, read_body_now
from service.shedding import requested_timeout
from service.store import ImageInput, TensorSpec
from service.telemetry import Figures
from service.versions import ReadyVersion

log = logging.getLogger(__name__)
_NUMERIC_KINDS = "fiu"  # floats and integers; bools, strings and objects are refused


@dataclass
class Parsed:
    """A body as its protocol read it, before the version it runs on is final."""

    payload: Any  # the protocol's own (the JSON object, the binary part)
    model: str | None = None  # named in the body (None: as the path, or the default model)
    version: int | None = None
    timeout_s: float | None = None  # a time budget named in the body (V2's parameters.timeout)


class Codec(Protocol):
    """One protocol's side of the path."""

    binary: bool  # reads application/octet-stream bodies too
    images: bool  # reads image/png and image/jpeg bodies too
    route: str  # for the log
    over_grpc: bool  # counted among the gRPC requests too (service.telemetry)

    def version(self, name: str | None, text: str | None) -> int | None:
        """The version a URL path names (400 or 404 for a malformed one)."""
        ...

    def limit(self, request: Request, ready: ReadyVersion | None) -> BodyLimit:
        """The body this request may send, checked from its headers first (413)."""
        ...

    def parse(self, body: bytes, request: Request, name: str | None, number: int | None) -> Parsed:
        """The body read; ``name`` and ``number``: what the path named, which the body's own
        names must agree with (400)."""
        ...

    def rows(self, parsed: Parsed, ready: ReadyVersion) -> list[np.ndarray] | EncodedImages:
        """One array per input of the version, in the manifest's order, in its wire dtype; or
        the encoded images sent for its image input."""
        ...

    def encode(self, ready: ReadyVersion, outputs: Array, parsed: Parsed) -> Response: ...


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
    if spec.dtype != "float32":
        return _as_dtype(rows, spec)
    if rows.dtype == np.float32:
        if not all_finite(rows):
            raise _non_finite(spec)
        return rows
    # NOTE: a range check instead of np.errstate around the cast: entering errstate costs more
    # than the whole cast for a one-sample request. NaN fails the check too. Values in range,
    # and integers of any width, are finite once cast: no second check after the cast.
    if rows.dtype.kind == "f" and not within_float32(rows):
        raise _non_finite(spec)
    return rows.astype(np.float32)


def validate_inputs(tensors: list[np.ndarray], inputs: Packing) -> Array:
    """Each input checked against its spec, then one row per sample (``service.packing``)."""
    if inputs.single:
        return validate_rows(tensors[0], inputs.specs[0])
    checked = [validate_rows(t, spec) for t, spec in zip(tensors, inputs.specs, strict=True)]
    return inputs.pack(checked)


def image_input(ready: ReadyVersion) -> ImageInput:
    """The preprocessing that makes images the version's input, if it has one (415 if not)."""
    spec = ready.manifest.image
    if spec is None or not ready.signature.inputs.single:
        raise UnsupportedMediaType(
            f"model {ready.name!r} v{ready.version} takes no images: it was exported without "
            "the preprocessing its images need (--image-mean, --image-std); send tensors"
        )
    return spec


def _as_dtype(rows: np.ndarray, spec: TensorSpec) -> Array:
    """Rows for an input of another dtype than float32, checked to fit it, then cast."""
    target = np.dtype(spec.dtype)
    if target.kind == "f":  # float16: finite, and within its range
        limit = float(np.finfo(target).max)
        wide = rows.astype(np.float64)  # np.abs of int64's minimum overflows: not in float64
        if rows.size and not (np.isfinite(wide).all() and float(np.abs(wide).max()) <= limit):
            raise InvalidInput(
                f"input {spec.name!r} holds values beyond {spec.dtype} (finite, |x| <= {limit:g})"
            )
        return rows.astype(target)
    if rows.dtype.kind not in "iu":
        raise InvalidInput(f"input {spec.name!r} takes integers ({spec.dtype}), got {_kind(rows)}")
    info = np.iinfo(target)
    if rows.size and (int(rows.min()) < info.min or int(rows.max()) > info.max):
        raise InvalidInput(
            f"input {spec.name!r} holds values outside {spec.dtype} ({info.min} to {info.max})"
        )
    return rows.astype(target, copy=False)


def check_image_count(count: int, ready: ReadyVersion) -> None:
    """Refuse, before one is decoded, more images than the version's queue can ever hold: each
    becomes a whole input tensor (a 3x224x224 image: 602 KB from a file of 67 bytes)."""
    limit = ready.admission.max_queue_rows
    if count > limit:
        raise PayloadTooLarge(
            f"request holds {count} images but at most {limit} rows can queue for model "
            f"{ready.name!r} v{ready.version} ({ready.admission.queue_limit}): send fewer"
        )


def _non_finite(spec: TensorSpec) -> InvalidInput:
    return InvalidInput(
        f"input {spec.name!r} holds non-finite values (NaN, infinity or beyond float32 range)"
    )


def predictions(ready: ReadyVersion, outputs: Array) -> list[str] | list[int] | None:
    """For classifiers: the label (or index, without labels) of each row's arg-max."""
    manifest = ready.manifest
    if manifest.task != "classification" or not len(outputs):
        return None
    outputs = ready.signature.outputs.part(outputs, 0)  # the labels name the first output's values
    best = (outputs if outputs.ndim == 2 else outputs.reshape(len(outputs), -1)).argmax(axis=1)
    if manifest.labels:
        return [manifest.labels[i] for i in best.tolist()]
    return [int(i) for i in best.tolist()]


def _kind(rows: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes", "O": "mixed or missing values"}.get(
        rows.dtype.kind, str(rows.dtype)
    )


class DataPlane:
    def __init__(
        self,
        registry: Registry,
        unresolved: Figures,
        *,
        keys: Keys | None = None,
        request_timeout_s: float | None = None,
        shed_log: RepeatedLog | None = None,
        images: ImageDecoder | None = None,
    ) -> None:
        self.registry = registry
        self.unresolved = unresolved  # where requests that resolved to no version are counted
        self.keys = keys  # None when no key is required: no check at all
        self.request_timeout_s = request_timeout_s
        self.shed_log = shed_log or RepeatedLog(log, "shedding load")
        # NOTE: while a model loads, or after it is unloaded, every request for it gets a 503,
        # and a request the batcher could not answer in time a 504: counted, not a line each.
        self.unanswered_log = RepeatedLog(log, "requests not answered")
        self.images = images or ImageDecoder(1 << 24, "max_image_pixels", 1)

    def deadline(self, arrived: float, requested_s: float | None) -> float | None:
        """The loop-clock time a request's answer is due: its own budget, capped by the server's,
        counted from its arrival."""
        cap = self.request_timeout_s
        budget = (
            cap if requested_s is None else requested_s if cap is None else min(requested_s, cap)
        )
        return None if budget is None else arrived + budget

    async def serve(
        self, request: Request, codec: Codec, name: str | None, version_text: str | None
    ) -> Response:
        ready: ReadyVersion | None = None
        ticket: Ticket | None = None
        try:
            if self.keys is not None:
                self.keys.check(request.head)  # first: a caller without the key learns nothing
            decoder = body_decoder(request.head, binary=codec.binary, images=codec.images)
            deadline = self.deadline(request.arrived, requested_timeout(request.head.timeout))
            number = codec.version(name, version_text)
            try:
                ready = self.registry.resolve(name, number)
            except FoldserveError:
                if name is not None:
                    raise
                # A path naming no model: the body may name one; the default's absence or
                # state is reported only if it does not.
            if ready is not None:
                request.served(ready.name, ready.version)
                # NOTE: each step that may wait is tried first without a coroutine: most
                # requests never wait, and for a small model the coroutines cost more than it.
                ticket = ready.admission.try_enter(deadline)
                if ticket is None:
                    ticket = await ready.admission.wait_to_enter(deadline)
            limit = codec.limit(request, ready)
            body = read_body_now(request, limit, decoder)
            if body is None:
                body = await read_body(request, limit, decoder)
            parsed = codec.parse(body, request, name, number)
            if parsed.timeout_s is not None:  # the body's budget beats the header's
                deadline = self.deadline(request.arrived, parsed.timeout_s)
            target = self._final(ready, name, number, parsed)
            if target is not ready:
                if ticket is not None:
                    ticket.leave()
                    ticket = None
                ready = target
                request.served(ready.name, ready.version)
                ticket = ready.admission.enter_now()
            assert ticket is not None and ready is not None
            tensors = codec.rows(parsed, ready)
            if isinstance(tensors, EncodedImages):  # counted, then decoded off the event loop
                spec = image_input(ready)
                check_image_count(len(tensors.files), ready)
                tensors = [await self.images.rows(tensors.files, spec)]
            rows = validate_inputs(tensors, ready.signature.inputs)
            request.rows = rows
            if not ticket.admit_now(len(rows), deadline):
                await ticket.admit_when_room(len(rows), deadline)
            submitted = time.perf_counter()
            outputs = ready.batcher.try_now(rows)  # finite, or InvalidInput (service.finite)
            if outputs is None:
                outputs = await ready.batcher.submit(rows, deadline)
            returned = time.perf_counter()
            response = codec.encode(ready, outputs, parsed)
        except FoldserveError as exc:
            self._refused(ready, exc, request.started, codec.over_grpc)
            return failure(exc)
        except asyncio.CancelledError:
            # The connection closed: nobody reads an answer (its rows left the queue).
            self._count(ready, 499, request.started, grpc=codec.over_grpc)
            raise
        except Exception:
            self._count(ready, 500, request.started, grpc=codec.over_grpc)
            raise  # the server answers 500 with an id to find it in the log
        finally:
            if ticket is not None:
                ticket.leave()
        finished = time.perf_counter()
        ready.figures.answered(
            len(rows),
            finished - request.started,
            submitted - request.started,
            finished - returned,
            codec.over_grpc,
        )
        # answered rows only; folded in later, off the event loop
        ready.drift.observe(ready.signature.inputs.part(rows, 0))
        return response

    def _final(
        self, ready: ReadyVersion | None, name: str | None, number: int | None, parsed: Parsed
    ) -> ReadyVersion:
        """The version the request runs on once its body is read: the one resolved from the
        path, unless the body named another (which must agree with the path)."""
        same_model = parsed.model is None or (ready is not None and parsed.model == ready.name)
        if ready is not None and same_model and parsed.version in (None, ready.version):
            return ready
        model = parsed.model if parsed.model is not None else name
        version = parsed.version if parsed.version is not None else number
        return self.registry.resolve(model, version)

    def _refused(
        self, ready: ReadyVersion | None, error: FoldserveError, started: float, grpc: bool
    ) -> None:
        shed = error.reason if isinstance(error, Overloaded) else None
        self._count(ready, error.status, started, shed, grpc)
        if isinstance(error, Overloaded):
            # Refusals under overload come in thousands: one line, then a summary per interval.
            name = ready.name if ready is not None else ""
            self.shed_log.note(name, error.reason, error.message)
        elif isinstance(error, ModelNotReady | InferenceTimeout):
            name = ready.name if ready is not None else ""
            self.unanswered_log.note(name, f"{error.status}", error.logged())
        elif error.status >= 500:
            log.warning("%s (%d): %s", type(error).__name__, error.status, error.logged())

    def _count(
        self,
        ready: ReadyVersion | None,
        status: int,
        started: float,
        shed: str | None = None,
        grpc: bool = False,
    ) -> None:
        figures = self.unresolved if ready is None else ready.figures
        figures.refused(status, time.perf_counter() - started, shed, grpc)
