"""The Open Inference Protocol's gRPC service, on its own port, in the HTTP server's event loop.

The connections are foldserve's own (service.rpc.wire), run in the same loop as the HTTP server,
so a ``ModelInfer`` call goes through the same request path (service.dataplane) as a REST
request: the same keys, limits, deadlines, admission, batches (gRPC and REST requests for one
version run together), errors and figures. Health checking (``grpc.health.v1``) and
``ServerLive``/``ServerReady`` stay open, as the REST probes do; every other method needs the
inference key when one is set, and the repository methods the management API and its key.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from service.dataplane import DataPlane
from service.http.limits import BodyBudget
from service.http.request import Request
from service.keys import Keys
from service.registry import Registry
from service.request_body import BodyLimit
from service.rpc import health_pb2
from service.rpc import inference_pb2 as pb
from service.rpc.calls import serialize
from service.rpc.control import ControlHandlers
from service.rpc.infer import InferHandlers
from service.rpc.status import Code
from service.rpc.wire.connection import Connection, WireLimits
from service.rpc.wire.methods import Kind, Method
from service.settings import Settings, setting_ref
from service.telemetry import Telemetry

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
STOPPING = "the server is shutting down"


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
        budget: BodyBudget | None = None,
    ) -> None:
        self._settings = settings
        limit = BodyLimit(
            settings.max_body_bytes, setting_ref("max_body_bytes", settings.max_body_bytes)
        )
        self._infer = InferHandlers(dataplane, limit, access_log)
        self._control = ControlHandlers(settings, registry, telemetry, *keys, draining)
        # What each connection reads (service.rpc.wire.connection.Site).
        self.methods = self._inference_methods() | self._health_methods()
        self.limits = WireLimits(
            settings.max_body_bytes,
            settings.max_header_bytes,
            settings.max_connections,
            settings.header_timeout_s,
        )
        self.budget = budget if budget is not None else BodyBudget(settings.max_body_memory_bytes)
        self._connections: set[Connection] = set()
        self._server: asyncio.Server | None = None
        self.port: int | None = None  # once listening (grpc_port 0: the one the OS picked)

    def opened(self, connection: Connection) -> int:
        self._connections.add(connection)
        return len(self._connections)

    def closed(self, connection: Connection) -> None:
        self._connections.discard(connection)

    async def start(self) -> int:
        settings = self._settings
        loop = asyncio.get_running_loop()
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        try:
            server = await loop.create_server(
                lambda: Connection(self),
                settings.host,
                settings.grpc_port,
                reuse_port=True,  # --workers share the port, as they share HTTP's
                backlog=2048,
            )
        except OSError as exc:
            raise OSError(
                f"cannot listen for gRPC on {host}:{settings.grpc_port} (grpc_port): {exc}"
            ) from exc
        port: int = server.sockets[0].getsockname()[1]
        self._server, self.port = server, port
        log.info("foldserve gRPC listening on %s:%d (pid %d)", host, port, os.getpid())
        return port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, answer those accepted within ``grace_s``, then end the rest."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.go_away()
            # Open until the client leaves: waiting for them would only delay the exit.
            connection.end_calls(_lasting, Code.UNAVAILABLE, STOPPING)
        waiting = [c.closed for c in connections if not c.closed.done()]
        if waiting and grace_s > 0:
            await asyncio.wait(waiting, timeout=grace_s)
        for connection in list(self._connections):
            connection.end_calls(_any, Code.UNAVAILABLE, STOPPING)
            connection.go_away()
        await server.wait_closed()

    def _inference_methods(self) -> dict[bytes, Method]:
        control = self._control
        unary = {
            "ServerLive": (control.server_live, pb.ServerLiveRequest),
            "ServerReady": (control.server_ready, pb.ServerReadyRequest),
            "ModelReady": (control.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (control.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (control.model_metadata, pb.ModelMetadataRequest),
            "ModelConfig": (control.model_config, pb.ModelConfigRequest),
            "ModelStatistics": (control.model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": (control.repository_index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": (control.repository_load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": (control.repository_unload, pb.RepositoryModelUnloadRequest),
        }
        methods = {_path(SERVICE, name): _unary(*pair) for name, pair in unary.items()}
        # Bytes in, bytes out: the request path reads the message's own bytes.
        methods[_path(SERVICE, "ModelInfer")] = Method(Kind.UNARY, self._infer.unary)
        methods[_path(SERVICE, "ModelStreamInfer")] = Method(Kind.BIDI, self._infer.stream)
        return methods

    def _health_methods(self) -> dict[bytes, Method]:
        control = self._control
        read = health_pb2.HealthCheckRequest.FromString
        return {
            _path(HEALTH, "Check"): _unary(control.health_check, health_pb2.HealthCheckRequest),
            _path(HEALTH, "Watch"): Method(
                Kind.SERVER_STREAM, control.health_watch, read, serialize, lasting=True
            ),
        }


def _path(service: str, method: str) -> bytes:
    return f"/{service}/{method}".encode()


def _unary(handler: Callable[..., Any], request_type: type[Message]) -> Method:
    return Method(Kind.UNARY, handler, request_type.FromString, serialize)


def _lasting(call: Any) -> bool:
    return call.method is not None and call.method.lasting


def _any(call: Any) -> bool:
    return True
