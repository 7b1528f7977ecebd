"""What every gRPC handler reads off its call (the metadata as HTTP's headers, the deadline, the
peer) and how it refuses one (the one error hierarchy's status, mapped once)."""

from __future__ import annotations

from typing import Any, TypeAlias

import orjson
from google.protobuf.message import Message

from service.errors import FoldserveError
from service.http.request import Head
from service.http.response import Response
from service.rpc.status import grpc_status

# grpc.aio.ServicerContext: grpcio ships no type information, so the alias says what it is.
Context: TypeAlias = Any


def serialize(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def head_of(context: Context) -> Head:
    """The metadata the request path reads, as the HTTP headers of the same names; the call's
    deadline as its time budget (capped by request_timeout_s, as X-Request-Timeout is)."""
    head = Head()
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            if key == "authorization" and head.authorization is None:
                head.authorization = value.encode()
            elif key == "x-api-key" and head.api_key is None:
                head.api_key = value.encode()
            elif key == "x-request-id" and head.request_id is None:
                head.request_id = value.encode()
    remaining = context.time_remaining()
    if remaining is not None:
        head.timeout = b"%.6f" % max(remaining, 1e-6)
    return head


def client_of(context: Context) -> tuple[str, int] | None:
    peer = context.peer() or ""  # "ipv4:127.0.0.1:53422", "ipv6:[::1]:53422"
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind in ("ipv4", "ipv6") and port.isdigit():
        return host.strip("[]"), int(port)
    return None


async def abort(context: Context, error: FoldserveError) -> Any:
    headers = tuple((k.lower(), v) for k, v in error.headers().items())
    if headers:
        context.set_trailing_metadata(headers)
    await context.abort(grpc_status(error.status), error.message)


def error_message(response: Response) -> str:
    """A refusal's message, from the request path's rendering of it (its JSON error body)."""
    try:
        return str(orjson.loads(response.body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "refused"


async def abort_with(context: Context, response: Response) -> Any:
    """A refusal the request path rendered, as the call's status."""
    headers = tuple((k.decode(), v.decode()) for k, v in response.headers)
    if headers:
        context.set_trailing_metadata(headers)
    await context.abort(grpc_status(response.status), error_message(response))
