"""The Open Inference Protocol's gRPC service, on its own port, in the HTTP server's event loop.

grpcio's asyncio server runs in the same loop as the HTTP server, so a ``ModelInfer`` call goes
through the same request path (service.dataplane) as a REST request: the same keys, limits,
deadlines, admission, batches (gRPC and REST requests for one version run together), errors and
figures. Health checking (``grpc.health.v1``) and ``ServerLive``/``ServerReady`` stay open, as
the REST probes do; every other method needs the inference key when one is set.

NOTE: handlers are registered as generic method handlers with the generated messages; the
``ModelInfer`` handler takes the message's bytes as they arrived, so that the request path
accounts for them as it does for a REST body.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import orjson
from google.protobuf import json_format
from google.protobuf.message import Message

from service import v2_documents as documents
from service.dataplane import DataPlane
from service.errors import FoldserveError, ModelNotFound
from service.http.context import RequestIds, enter, leave
from service.http.request import Body, Head, Request
from service.http.response import Response
from service.keys import Keys
from service.registry import Registry
from service.request_body import BodyLimit
from service.routes.paths import v2_path_version
from service.rpc import health_pb2
from service.rpc import inference_pb2 as pb
from service.rpc.codec import InferCall, infer_request
from service.rpc.status import grpc_status
from service.settings import Settings, setting_ref

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
_WATCH_EVERY_S = 1.0  # how often Watch looks at a status again
Serving = health_pb2.HealthCheckResponse.ServingStatus

AccessLog = Callable[[Request, int], None]


class GrpcServer:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        dataplane: DataPlane,
        keys: Keys,
        draining: Callable[[], bool],
        access_log: AccessLog | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._dataplane = dataplane
        self._keys = keys if keys.required else None
        self._draining = draining
        self._access_log = access_log
        self._ids = RequestIds()
        self._limit = BodyLimit(
            settings.max_body_bytes, setting_ref("max_body_bytes", settings.max_body_bytes)
        )
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None  # once listening (grpc_port 0: the one the OS picked)

    async def start(self) -> int:
        settings = self._settings
        server = grpc.aio.server(
            options=[
                # Refused from its length prefix, before it is read whole (RESOURCE_EXHAUSTED).
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 1),  # --workers share the port, as they share HTTP's
            ]
        )
        server.add_generic_rpc_handlers([self._inference_handlers(), self._health_handlers()])
        address = f"{settings.host}:{settings.grpc_port}"
        if ":" in settings.host:
            address = f"[{settings.host}]:{settings.grpc_port}"
        try:
            port: int = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {address} (grpc_port): {exc}") from exc
        await server.start()
        self._server, self.port = server, port
        log.info("foldserve gRPC listening on %s:%d (pid %d)", settings.host, port, os.getpid())
        return port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, answer those accepted within ``grace_s``, then cancel the rest."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    # ---------------------------------------------------------------- handlers

    def _inference_handlers(self) -> grpc.GenericRpcHandler:
        def unary(
            handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
            request_type: type[Message] | None,
        ) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                handler,
                request_deserializer=None if request_type is None else request_type.FromString,
                response_serializer=None if request_type is None else _serialize,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": unary(self._server_live, pb.ServerLiveRequest),
                "ServerReady": unary(self._server_ready, pb.ServerReadyRequest),
                "ModelReady": unary(self._model_ready, pb.ModelReadyRequest),
                "ServerMetadata": unary(self._server_metadata, pb.ServerMetadataRequest),
                "ModelMetadata": unary(self._model_metadata, pb.ModelMetadataRequest),
                "ModelConfig": unary(self._model_config, pb.ModelConfigRequest),
                "ModelInfer": unary(self._model_infer, None),  # bytes in, bytes out
            },
        )

    def _health_handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            HEALTH,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self._health_check,
                    request_deserializer=health_pb2.HealthCheckRequest.FromString,
                    response_serializer=_serialize,
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self._health_watch,
                    request_deserializer=health_pb2.HealthCheckRequest.FromString,
                    response_serializer=_serialize,
                ),
            },
        )

    # -- open: liveness, readiness, health checking

    async def _server_live(
        self, _: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(
        self, _: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    def _ready(self) -> bool:
        return not self._draining() and self._registry.readiness()[0]

    def _serving(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        """The health of the server (``""``) or of one model, by name."""
        if service == "":
            return Serving.SERVING if self._ready() else Serving.NOT_SERVING
        if self._draining():
            return Serving.NOT_SERVING
        try:
            self._registry.resolve(service, None)
        except ModelNotFound:
            return Serving.SERVICE_UNKNOWN
        except FoldserveError:
            return Serving.NOT_SERVING
        return Serving.SERVING

    async def _health_check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._serving(request.service)
        if status == Serving.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def _health_watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self._serving(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(_WATCH_EVERY_S)

    # -- behind the inference key

    async def _model_ready(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        await self._check_key(context)
        try:
            self._registry.resolve(request.name, self._version(request.name, request.version))
        except FoldserveError as exc:
            if exc.status == 400:
                await _abort(context, exc)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def _server_metadata(
        self, _: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        await self._check_key(context)
        answer: pb.ServerMetadataResponse = json_format.ParseDict(
            documents.server_metadata(self._settings), pb.ServerMetadataResponse()
        )
        return answer

    async def _model_metadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        await self._check_key(context)
        try:
            entry = self._registry.resolve(
                request.name, self._version(request.name, request.version)
            )
        except FoldserveError as exc:
            await _abort(context, exc)
        answer: pb.ModelMetadataResponse = json_format.ParseDict(
            documents.model_metadata(self._registry, entry), pb.ModelMetadataResponse()
        )
        return answer

    async def _model_config(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        await self._check_key(context)
        try:
            entry = self._registry.resolve(
                request.name, self._version(request.name, request.version)
            )
        except FoldserveError as exc:
            await _abort(context, exc)
        config = json_format.ParseDict(documents.model_config(entry), pb.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def _model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started, arrived = time.perf_counter(), asyncio.get_running_loop().time()
        head = _head(context)
        request_id = self._ids.of(head)
        await context.send_initial_metadata((("x-request-id", request_id.decode()),))
        try:
            message = infer_request(raw)
        except FoldserveError as exc:
            self._dataplane.unresolved.refused(exc.status, time.perf_counter() - started)
            await _abort(context, exc)
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
            client=_client(context),
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
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception as exc:
            error_id = os.urandom(4).hex()
            log.error("unexpected error %s in gRPC ModelInfer", error_id, exc_info=exc)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error {error_id}: see the server log"
            )
        finally:
            body.release()
            if self._access_log is not None:
                self._access_log(request, status)
            leave(entered)
        if status != 200:
            await _abort_with(context, response)
        answer: bytes = response.body
        return answer

    # -- helpers

    async def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        if self._keys is not None:
            try:
                self._keys.check(_head(context))
            except FoldserveError as exc:
                await _abort(context, exc)

    def _version(self, name: str, text: str) -> int | None:
        return v2_path_version(name, text or None)


def _serialize(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _head(context: grpc.aio.ServicerContext) -> Head:
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


def _client(context: grpc.aio.ServicerContext) -> tuple[str, int] | None:
    peer = context.peer() or ""  # "ipv4:127.0.0.1:53422", "ipv6:[::1]:53422"
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind in ("ipv4", "ipv6") and port.isdigit():
        return host.strip("[]"), int(port)
    return None


async def _abort(context: grpc.aio.ServicerContext, error: FoldserveError) -> Any:
    headers = tuple((k.lower(), v) for k, v in error.headers().items())
    if headers:
        context.set_trailing_metadata(headers)
    await context.abort(grpc_status(error.status), error.message)


async def _abort_with(context: grpc.aio.ServicerContext, response: Response) -> Any:
    """A refusal the request path rendered (its JSON error body) as the call's status."""
    try:
        message = str(orjson.loads(response.body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = "refused"
    headers = tuple((k.decode(), v.decode()) for k, v in response.headers)
    if headers:
        context.set_trailing_metadata(headers)
    await context.abort(grpc_status(response.status), message)
