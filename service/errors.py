"""One error hierarchy; each error carries the HTTP status it maps to; one handler renders it.

``message`` is what a client reads: it never names a server path or quotes a library's own error
text. ``detail`` is what only the log shows (the path, onnxruntime's message).
"""

from __future__ import annotations

import os


class FoldserveError(Exception):
    """Base of every error foldserve raises on purpose."""

    status: int = 500

    def __init__(
        self, message: str, *, status: int | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status

    def headers(self) -> dict[str, str]:
        return {}

    def logged(self) -> str:
        """The message with its detail: what the log shows, never a client."""
        return self.message if self.detail is None else f"{self.message} [{self.detail}]"


class InvalidInput(FoldserveError):
    status = 400


class ClientDisconnected(FoldserveError):
    """The client went away mid-request; 499 (nginx's "client closed request") in the metrics."""

    status = 499


class RequestTimeout(FoldserveError):
    """The client took too long to send a request's headers or body: 408, connection closed."""

    status = 408


class HeaderFieldsTooLarge(FoldserveError):
    """The request's headers pass ``max_header_bytes`` or ``max_headers``: 431."""

    status = 431


class Unauthorized(FoldserveError):
    """A key is required and none, or a wrong one, was sent."""

    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="foldserve"'}


class PayloadTooLarge(FoldserveError):
    status = 413


class UnsupportedMediaType(FoldserveError):
    """A body in a form the route does not read: its Content-Type or Content-Encoding. 415.

    ``accept_encoding`` lists the encodings that are read, sent back as ``Accept-Encoding`` when
    the encoding was the problem (RFC 7694).
    """

    status = 415

    def __init__(self, message: str, *, accept_encoding: str | None = None) -> None:
        super().__init__(message)
        self.accept_encoding = accept_encoding

    def headers(self) -> dict[str, str]:
        return {} if self.accept_encoding is None else {"Accept-Encoding": self.accept_encoding}


class ModelNotFound(FoldserveError):
    status = 404


class ModelNotReady(FoldserveError):
    """Loading, failed its checks, or stopping: 503 with ``Retry-After`` (another version, or
    this one once loaded, may answer soon)."""

    status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class Overloaded(FoldserveError):
    """Refused to protect the answers already promised: 503 with ``Retry-After``.

    ``reason`` says why, for the shed counter: "queue_full" (no room for the rows) or
    "deadline" (the estimated wait is longer than the request's time budget).
    """

    status = 503

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int = 1,
        reason: str = "queue_full",
        model: str | None = None,
        version: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason
        self.model = model  # the version it was refused for, when known: for the shed counter
        self.version = version

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class InferenceTimeout(FoldserveError):
    status = 504


class BackendError(FoldserveError):
    """The runtime failed while running a batch: only that batch's requests see it."""

    status = 500


class ConfigError(FoldserveError):
    """A setting or a file on disk is wrong; the message names the value and the fix."""

    status = 500


class StoreError(FoldserveError):
    """The model store holds something unreadable or inconsistent."""

    status = 500


class VerificationError(FoldserveError):
    """A model failed a check that proves it never uses batch statistics; it is not served."""

    status = 500


class FoldingError(FoldserveError):
    """A network cannot be folded safely (e.g. a BN without running statistics)."""

    status = 500


def public_message(exc: BaseException) -> str:
    """A failure as a client may read it (/models, readiness): our errors' messages, which name
    no server path; for anything else only its kind, since its text may name paths or library
    internals. The log gets ``logged_message``."""
    if isinstance(exc, FoldserveError):
        return exc.message
    if isinstance(exc, OSError):
        name = os.path.basename(os.fsdecode(exc.filename)) if exc.filename else "a file"
        return f"cannot read {name}: {exc.strerror or type(exc).__name__}"
    return "unexpected error (details in the server log)"


def logged_message(exc: BaseException) -> str:
    return exc.logged() if isinstance(exc, FoldserveError) else f"{type(exc).__name__}: {exc}"
