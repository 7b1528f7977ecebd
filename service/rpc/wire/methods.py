"""A gRPC method as the transport runs it: its kind, its handler, and how its messages are read
and written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Kind(Enum):
    UNARY = "unary"  # one request, one response
    SERVER_STREAM = "server_stream"  # one request, responses until the handler ends
    BIDI = "bidi"  # requests and responses, each side at its own pace


@dataclass(frozen=True)
class Method:
    kind: Kind
    handler: Callable[..., Any]
    read: Callable[[bytes], Any] | None = None  # None: the handler takes the message's bytes
    write: Callable[[Any], bytes] | None = None  # None: the handler gives the message's bytes
    # Open until the client leaves (health Watch): a drain ends it rather than waits for it.
    lasting: bool = False
