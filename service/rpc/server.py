"""The Open Inference Protocol's gRPC service, on its own port, in the HTTP server's event loop.

grpcio's asyncio server runs in the same loop as the HTTP server, so a ``ModelInfer`` call goes
through the same request path (service.dataplane) as a REST request: the same keys, limits,
deadlines, admission, batches (gRPC and REST requests for one version run together), errors and
figures. Health checking (``grpc.health.v1``) and ``ServerLive``/``ServerReady`` stay open, as
the REST probes do; every other method needs the inference key when one is set, and the
repository methods the management API and its key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from service.dataplane import DataPlane
from service.http.request import Request
from service.keys import Keys
from service.registry import Registry
from service.request_body import BodyLimit
from service.rpc import health_pb2
from service.rpc import inference_pb2 as pb
from service.rpc.calls import serialize
from service.rpc.control import ControlHandlers
from service.rpc.infer import InferHandlers
from service.settings import Settings, setting_ref
from service.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"


class GrpcServer:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        dataplane: DataPlane,
        telemetry: Telemetry,
        keys: tuple[Keys, Keys],  # inference, management
        draining: Callable[[], bool],
        access_log: Callable[[Request, int], None] | None = None,
    ) -> None:
        self._settings = settings
        limit = BodyLimit(
            settings.max_body_bytes, setting_ref("max_body_bytes", settings.max_body_bytes)
        )
        self._infer = InferHandlers(dataplane, limit, access_log)
        self._control = ControlHandlers(settings, registry, telemetry, *keys, draining)
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
        server.add_generic_rpc_handlers([self._inference_methods(), self._health_methods()])
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        address = f"{host}:{settings.grpc_port}"
        try:
            port: int = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {address} (grpc_port): {exc}") from exc
        await server.start()
        self._server, self.port = server, port
        log.info("foldserve gRPC listening on %s:%d (pid %d)", host, port, os.getpid())
        return port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, answer those accepted within ``grace_s``, then cancel the rest."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace_s)

    def _inference_methods(self) -> grpc.GenericRpcHandler:
        control = self._control
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ServerLive": _unary(control.server_live, pb.ServerLiveRequest),
                "ServerReady": _unary(control.server_ready, pb.ServerReadyRequest),
                "ModelReady": _unary(control.model_ready, pb.ModelReadyRequest),
                "ServerMetadata": _unary(control.server_metadata, pb.ServerMetadataRequest),
                "ModelMetadata": _unary(control.model_metadata, pb.ModelMetadataRequest),
                "ModelConfig": _unary(control.model_config, pb.ModelConfigRequest),
                "ModelStatistics": _unary(control.model_statistics, pb.ModelStatisticsRequest),
                "RepositoryIndex": _unary(control.repository_index, pb.RepositoryIndexRequest),
                "RepositoryModelLoad": _unary(
                    control.repository_load, pb.RepositoryModelLoadRequest
                ),
                "RepositoryModelUnload": _unary(
                    control.repository_unload, pb.RepositoryModelUnloadRequest
                ),
                # Bytes in, bytes out: the request path reads the message's own bytes.
                "ModelInfer": grpc.unary_unary_rpc_method_handler(self._infer.unary),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._infer.stream),
            },
        )

    def _health_methods(self) -> grpc.GenericRpcHandler:
        control = self._control
        read = health_pb2.HealthCheckRequest.FromString
        return grpc.method_handlers_generic_handler(
            HEALTH,
            {
                "Check": _unary(control.health_check, health_pb2.HealthCheckRequest),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    control.health_watch, request_deserializer=read, response_serializer=serialize
                ),
            },
        )


def _unary(handler: Callable[..., Any], request_type: type[Message]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=request_type.FromString, response_serializer=serialize
    )
