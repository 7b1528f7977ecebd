"""What every gRPC handler reads off its call (the metadata as HTTP's headers, the deadline, the
peer) and how it refuses one (the one error hierarchy's status, mapped once)."""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf.message import Message

from service.errors import FoldserveError
from service.http.request import Head
from service.http.response import Response
from service.rpc.status import grpc_status
from service.rpc.wire.call import Call

Context = Call  # what each handler is given beside its request


def serialize(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def head_of(context: Context) -> Head:
    """The metadata the request path reads, as the HTTP headers of the same names; the call's
    deadline as its time budget (capped by request_timeout_s, as X-Request-Timeout is)."""
    head = Head()
    fields = context.fields
    head.authorization = fields.authorization
    head.api_key = fields.api_key
    head.request_id = fields.request_id
    remaining = context.time_remaining()
    if remaining is not None:
        head.timeout = b"%.6f" % max(remaining, 1e-6)
    return head


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
