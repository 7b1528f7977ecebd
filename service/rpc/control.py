"""Every gRPC method but inference: liveness and readiness, health checking, metadata, config,
statistics and the model repository. Each answers from the same code as its REST route (the
documents of service.v2_documents and service.stats, read into the protocol's messages)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from google.protobuf import json_format

from service import v2_documents as documents
from service.errors import FoldserveError, ModelNotFound
from service.keys import Keys
from service.registry import Registry
from service.routes.paths import v2_path_version
from service.routes.repository import check_load_parameters
from service.rpc import health_pb2
from service.rpc import inference_pb2 as pb
from service.rpc.calls import Context, abort, head_of
from service.rpc.status import Code
from service.settings import Settings
from service.stats import model_stats
from service.telemetry import Telemetry
from service.versions import ReadyVersion

Serving = health_pb2.HealthCheckResponse.ServingStatus
WATCH_EVERY_S = 1.0  # how often Watch looks at a status again


class ControlHandlers:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        telemetry: Telemetry,
        inference_keys: Keys,
        management_keys: Keys,
        draining: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._telemetry = telemetry
        self._keys = inference_keys if inference_keys.required else None
        self._management_keys = management_keys
        self._draining = draining

    # -- open: liveness, readiness, health checking (probes send no key)

    async def server_live(self, _: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, _: pb.ServerReadyRequest, context: Context
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

    async def health_check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        status = self._serving(request.service)
        if status == Serving.SERVICE_UNKNOWN:
            await context.abort(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def health_watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self._serving(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_EVERY_S)

    # -- behind the inference key

    async def model_ready(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        await self._check(context, self._keys)
        try:
            self._registry.resolve(request.name, _version(request.name, request.version))
        except FoldserveError as exc:
            if exc.status == 400:
                await abort(context, exc)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(
        self, _: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        await self._check(context, self._keys)
        return _read(documents.server_metadata(self._settings), pb.ServerMetadataResponse())

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        entry = await self._resolved(request.name, request.version, context)
        document = documents.model_metadata(self._registry, entry)
        return _read(document, pb.ModelMetadataResponse())

    async def model_config(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        entry = await self._resolved(request.name, request.version, context)
        config = _read(documents.model_config(entry), pb.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def model_statistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        await self._check(context, self._keys)
        name = request.name or None
        try:
            version = None if name is None else _version(name, request.version)
            document = model_stats(self._registry, self._telemetry, name, version)
        except FoldserveError as exc:
            await abort(context, exc)
        return _read(document, pb.ModelStatisticsResponse())

    # -- the model repository: behind management_api and its key

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        await self._managing(context)
        rows = self._registry.index()
        if request.ready:
            rows = [row for row in rows if row["state"] == "READY"]
        return _read({"models": rows}, pb.RepositoryIndexResponse())

    async def repository_load(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        await self._managing(context)
        try:
            check_load_parameters(request.parameters)
            await self._registry.load(request.model_name)
        except FoldserveError as exc:
            await abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self._managing(context)
        try:
            await self._registry.unload(request.model_name)
        except FoldserveError as exc:
            await abort(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # -- helpers

    async def _check(self, context: Context, keys: Keys | None) -> None:
        if keys is not None:
            try:
                keys.check(head_of(context))
            except FoldserveError as exc:
                await abort(context, exc)

    async def _managing(self, context: Context) -> None:
        if not self._settings.management_api:
            # As over REST: nothing tells a prober the API is there but off.
            error = ModelNotFound("not found: the management API is off (FOLDSERVE_MANAGEMENT_API)")
            await abort(context, error)
        await self._check(context, self._management_keys)

    async def _resolved(self, name: str, version: str, context: Context) -> ReadyVersion:
        await self._check(context, self._keys)
        try:
            return self._registry.resolve(name, _version(name, version))
        except FoldserveError as exc:
            await abort(context, exc)
            raise  # abort raised already


def _version(name: str, text: str) -> int | None:
    return v2_path_version(name, text or None)


M = TypeVar("M")


def _read(document: dict[str, Any], message: M) -> M:
    """A REST document read into the protocol's message of the same fields."""
    json_format.ParseDict(document, message)
    return message
