"""The one place a call's handler is run and its outcome turned into the call's status."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.message import DecodeError

from service.rpc.status import Code
from service.rpc.wire.call import Aborted, Call
from service.rpc.wire.methods import Kind, Method

log = logging.getLogger(__name__)


async def run(method: Method, call: Call) -> None:
    """Run ``call``'s handler and end the call with its outcome: OK, the handler's abort, or
    a status for what went wrong (an unexpected error is logged with an id the client sees)."""
    try:
        if method.kind is Kind.BIDI:
            requests = call.requests()
            if method.read is not None:
                requests = _each_read(requests, method.read)
            await _send_all(call, method.handler(requests, call), method.write)
        else:
            request = call.only_message()
            if method.read is not None:
                request = method.read(request)
            if method.kind is Kind.UNARY:
                response = await method.handler(request, call)
                call.answer(method.write(response) if method.write else response)
                return
            await _send_all(call, method.handler(request, call), method.write)
        call.finish(Code.OK)
    except Aborted as exc:
        call.finish(exc.code, exc.details, exc.metadata)
    except DecodeError as exc:
        call.finish(Code.INVALID_ARGUMENT, f"the request message cannot be read: {exc}")
    except asyncio.CancelledError:
        # The client reset the stream, or the server stops: the call has its status already
        # (or no one to read one); this task ends here.
        call.finish(Code.CANCELLED, "cancelled")
    except Exception as exc:
        error_id = os.urandom(4).hex()
        log.error("unexpected error %s in gRPC %s", error_id, call.path[:200], exc_info=exc)
        call.finish(Code.UNKNOWN, f"internal error {error_id}: see the server log")


async def _send_all(
    call: Call, responses: AsyncIterator[Any], write: Callable[[Any], bytes] | None
) -> None:
    async for response in responses:
        call.send(write(response) if write else response)
        await call.writable()


async def _each_read(
    requests: AsyncIterator[bytes], read: Callable[[bytes], Any]
) -> AsyncIterator[Any]:
    async for raw in requests:
        yield read(raw)
