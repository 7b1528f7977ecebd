"""``ModelInfer`` and ``ModelStreamInfer``: each request through the request path
(service.dataplane), with the bytes it arrived as, so that it is counted against the same limits
as a REST body.

A stream's requests run side by side, each answered as soon as it is done (the client matches
them by ``id``): one request's refusal is that request's ``error_message`` and the stream goes
on, as tritonclient expects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

from service.dataplane import DataPlane
from service.errors import FoldserveError
from service.http.context import RequestIds, enter, leave
from service.http.request import Body, Head, Request
from service.http.response import Response, error_response, failure
from service.request_body import BodyLimit
from service.rpc import inference_pb2 as pb
from service.rpc.calls import Context, error_message, head_of
from service.rpc.codec import InferCall, infer_request
from service.rpc.messages import field
from service.rpc.status import grpc_status
from service.rpc.wire.call import Aborted

log = logging.getLogger(__name__)

AccessLog = Callable[[Request, int], None]
# A stream's requests in progress at once; the next one is read when one is answered. Each is
# admitted as any request is (the queue's bound), this only keeps one stream from holding
# thousands of tasks.
STREAM_IN_FLIGHT = 64
_STREAM_INFER_RESPONSE = 2  # ModelStreamInferResponse.infer_response's field number


class InferHandlers:
    def __init__(
        self, dataplane: DataPlane, limit: BodyLimit, access_log: AccessLog | None
    ) -> None:
        self._dataplane = dataplane
        self._limit = limit
        self._access_log = access_log
        self._ids = RequestIds()

    async def unary(self, raw: bytes, context: Context) -> bytes:
        head = head_of(context)
        request_id = self._ids.of(head)
        # NOTE: the id goes back with the status (trailing metadata): initial metadata sent on
        # its own is one more frame on the call.
        context.trailing_headers = [(b"x-request-id", request_id)]
        response = await self._serve(raw, head, request_id, context)
        if response.status != 200:
            context.trailing_headers += [(k.lower(), v) for k, v in response.headers]
            raise Aborted(grpc_status(response.status), error_message(response))
        return response.body

    async def stream(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        head = head_of(context)
        await context.send_initial_metadata((("x-request-id", self._ids.of(head).decode()),))
        # Bounded: answers the client does not read stop the stream's requests being taken,
        # and then, through the call's window, the client's sending (service.rpc.wire).
        answers: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=STREAM_IN_FLIGHT)
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def answer(raw: bytes) -> None:
            try:
                # Each request of the stream its own id (a stream is many requests).
                response = await self._serve(raw, _copy(head), self._ids.new(), context)
                await answers.put(_stream_answer(response))
            finally:
                room.release()

        async def read() -> None:
            try:
                async for raw in requests:
                    await room.acquire()
                    task = asyncio.ensure_future(answer(raw))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (message := await answers.get()) is not None:
                yield message
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _serve(self, raw: bytes, head: Head, request_id: bytes, context: Context) -> Response:
        started, arrived = time.perf_counter(), context.arrived
        try:
            message = infer_request(raw)
        except FoldserveError as exc:
            self._dataplane.unresolved.refused(exc.status, time.perf_counter() - started, grpc=True)
            return failure(exc)
        head.content_type = b"application/octet-stream"
        head.content_length = b"%d" % len(raw)
        body = Body(None)  # complete: the message arrived whole
        body.feed(raw)
        request = Request(
            "POST",
            b"",
            f"grpc:ModelInfer/{message.model_name[:200]}",
            b"",
            [],
            head,
            client=context.client,
            request_id=request_id,
            started=started,
            arrived=arrived,
            body=body,
        )
        entered = enter(request)
        status = 500
        try:
            response = await self._dataplane.serve(
                request,
                InferCall(message, self._limit),
                message.model_name,
                message.model_version or None,
            )
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception as exc:
            error_id = os.urandom(4).hex()
            log.error("unexpected error %s in gRPC ModelInfer", error_id, exc_info=exc)
            return error_response(500, f"internal error {error_id}: see the server log")
        finally:
            body.release()
            if self._access_log is not None:
                self._access_log(request, status)
            leave(entered)


def _copy(head: Head) -> Head:
    copied = Head()
    for name in Head.__slots__:
        setattr(copied, name, getattr(head, name))
    return copied


def _stream_answer(response: Response) -> bytes:
    """The ModelStreamInferResponse for one request: its response's bytes as they are, inside
    (a length-delimited field needs no re-encoding), or its error."""
    if response.status == 200:
        return field(_STREAM_INFER_RESPONSE, response.body)
    refusal = pb.ModelStreamInferResponse(error_message=error_message(response))
    data: bytes = refusal.SerializeToString()
    return data
