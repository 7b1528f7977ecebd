"""Log formats: ``text`` for a person at a terminal, ``json`` (one object per line) for a collector.

Both put the request id on every line written while a request is being answered (an error's
line, a warning, the access line), so one request's lines can be found together. Every logger of
the process writes through the root logger's handler, so with ``json`` every line the server
writes is one JSON object.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import orjson

from service.http.context import ACCESS_LOGGER, current_request_id

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# NOTE: attributes every LogRecord has; anything else on a record came from ``extra=`` and is
# one of our fields (the access line's). Read once from a blank record, not listed by hand.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, request_id when in a request,
    the fields passed with ``extra=``, and the traceback as ``exc`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id is not None:
            line["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _STANDARD:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The usual one-line text, with ``request_id=...`` appended to lines written in a request."""

    def __init__(self, fmt: str = TEXT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = current_request_id()
        if request_id is None or getattr(record, "request_id", None) is not None:
            return text
        head, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{head} request_id={request_id}{newline}{rest}"


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure_root(level: str, log_format: LogFormat) -> None:
    """Root handler on stderr in the chosen format; foldserve's loggers write through it.

    NOTE: like ``logging.basicConfig``, nothing is replaced when the root logger already has a
    handler (a test runner's, an embedding program's): only the level is set.
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter(log_format))
        root.addHandler(handler)
    # The access log is switched by its own setting (access_log), not hidden by log_level.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)


def _utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
