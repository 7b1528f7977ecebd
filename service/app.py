"""The application: settings, telemetry, registry, the request path and the FastAPI routes, wired
once by ``create_app``, and run by the server (``service.http.server``).

Inference requests go straight to the dataplane (``service.routes.inference``); every other
route (health, models, metrics, docs, the status page) is a FastAPI route, run through a small
ASGI bridge. Models load in the background at startup, so liveness answers meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
from collections.abc import Awaitable, Mapping
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi import Response as FastApiResponse
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from starlette.datastructures import State
from starlette.exceptions import HTTPException

from service import __version__
from service.blas import pin_numpy_blas
from service.cpus import usable_cpus
from service.dataplane import DataPlane
from service.drift_metrics import DriftCollector
from service.errors import FoldserveError, InvalidInput, Overloaded
from service.http.asgi import AsgiBridge
from service.http.context import write_access_line
from service.http.limits import BodyBudget
from service.http.request import Request as HttpRequest
from service.http.response import Response, answered, error_body, failure
from service.images import ImageDecoder
from service.keys import Keys
from service.logs import LogFormat, configure_root
from service.metrics import TelemetryCollector
from service.registry import Registry
from service.routes import drift, health, metrics, models, repository, stats, status_page, v2
from service.routes.access import inference_key
from service.routes.docs import docs_router, openapi_document
from service.routes.inference import InferenceRoutes
from service.routes.responses import unexpected
from service.rpc.server import GrpcServer
from service.settings import Settings, setting_ref, unknown_env_message, unknown_env_names
from service.telemetry import Telemetry

log = logging.getLogger(__name__)

# Health probes: answered even past max_connections, so that a busy server is not restarted.
PROBES = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


class Service:
    """What the server runs (``service.http.server.Application``)."""

    def __init__(
        self,
        settings: Settings,
        api: FastAPI,
        registry: Registry,
        telemetry: Telemetry,
        inference: InferenceRoutes,
        inference_keys: Keys,
    ) -> None:
        self.settings = settings
        self.api = api
        self.registry = registry
        self.telemetry = telemetry
        self.inference = inference
        self.inference_keys = inference_keys
        self._bridge = AsgiBridge(api)
        self._tasks: list[asyncio.Task[None]] = []
        # Request bodies held at once, HTTP and gRPC together (max_body_memory_bytes).
        self.body_budget = BodyBudget(settings.max_body_memory_bytes)
        self.grpc: GrpcServer | None = None  # once started (settings.grpc)
        self._grpc_stopping: asyncio.Future[None] | None = None
        self.access_log = (
            AccessLog(settings.access_log_sample, settings.proxy_headers)
            if settings.access_log and settings.access_log_sample > 0
            else None
        )

    @property
    def state(self) -> State:
        return self.api.state

    def openapi(self) -> dict[str, Any]:
        return self.api.openapi()

    # -- serving

    def handle(self, request: HttpRequest, over_limit: bool = False) -> Awaitable[Response]:
        # NOTE: returns the route's own coroutine rather than awaiting it in one of its own:
        # a coroutine frame less on every request.
        if over_limit and request.path not in PROBES:
            self.telemetry.unresolved.refused(503, 0.0, "connections")
            return answered(failure(self._too_many_connections()))
        target = self.inference.match(request.path)
        if target is not None:
            return self.inference.handle(request, target)
        return self._bridge(request)

    def eager(self, request: HttpRequest) -> bool:
        """Inference requests start at once, in the connection's call (service.http.eager):
        their path needs no current task; the FastAPI routes' (anyio) does."""
        return self.inference.match(request.path) is not None

    def _too_many_connections(self) -> FoldserveError:
        limit = setting_ref("max_connections", self.settings.max_connections)
        return Overloaded(
            f"too many open connections to this server process ({limit}): retry shortly, or "
            "reuse connections (keep-alive)",
            reason="connections",
        )

    # -- life

    async def startup(self) -> None:
        pin_numpy_blas()  # before any request: the request path's checks call BLAS too
        self.telemetry.share()  # with --workers: where the other workers read this one's
        self.registry.scan()
        loading = asyncio.create_task(_load_models(self.registry), name="foldserve-load")
        loading.add_done_callback(_log_crash)
        self._tasks.append(loading)
        if self.settings.load_before_serving:
            # Connections wait in the socket's queue until the models are verified, rather
            # than get 503 "loading".
            await asyncio.shield(loading)
        watching = asyncio.create_task(
            _watch_store(
                self.registry, loading, self.settings.poll_interval_s, self.inference_keys
            ),
            name="foldserve-watch",
        )
        watching.add_done_callback(_log_crash)
        self._tasks.append(watching)
        if self.settings.grpc:
            grpc = GrpcServer(
                self.settings,
                self.registry,
                self.api.state.dataplane,
                self.telemetry,
                (self.inference_keys, self.api.state.management_keys),
                lambda: bool(self.api.state.draining),
                self.access_log,
                self.body_budget,
            )
            await grpc.start()
            self.grpc = grpc

    def start_draining(self) -> None:
        """The server is shutting down: readiness turns 503 so that no new traffic is sent,
        and the gRPC service takes no new calls (those accepted are answered)."""
        self.api.state.draining = True
        if self.grpc is not None and self._grpc_stopping is None:
            self._grpc_stopping = asyncio.ensure_future(
                self.grpc.stop(self.settings.shutdown_grace_s)
            )

    async def shutdown(self) -> None:
        _stop_listening_for_sighup()
        if self.grpc is not None:
            if self._grpc_stopping is None:
                self._grpc_stopping = asyncio.ensure_future(self.grpc.stop(0))
            await self._grpc_stopping
        for task in reversed(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.registry.stop()  # drains: every accepted request is answered
        self.api.state.dataplane.images.close()
        gc.unfreeze()  # what was frozen at load may be garbage now (e.g. this app, in tests)


class AccessLog:
    """One line per answered request, for a ``sample`` fraction of them (drawn at random)."""

    def __init__(self, sample: float, proxy_headers: bool) -> None:
        self.sample = sample
        self.proxy_headers = proxy_headers

    def __call__(self, request: HttpRequest, status: int) -> None:
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        client = request.client[0] if request.client else None
        forwarded = request.head.forwarded_for
        if self.proxy_headers and forwarded:
            # The address the nearest proxy saw: the last entry it appended.
            client = forwarded.rsplit(b",", 1)[-1].strip().decode("latin-1")[:64]
        write_access_line(request, status, client)


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> Service:
    """Build the application; nothing runs until the server starts it.

    Raises ConfigError when ``api_key_file`` cannot be read or holds no key.
    """
    inference_keys = Keys("api_key", settings.api_key, settings.api_key_file)
    management_keys = Keys("management_api_key", settings.management_api_key)
    if settings.management_api and settings.management_api_key is None:
        log.warning(
            "the repository API (management_api) requires no key: anyone who reaches this port "
            "can load and unload models; set management_api_key to require one"
        )
    telemetry = Telemetry(settings.metrics_dir)
    model_registry = Registry(settings, telemetry)
    prometheus = registry if registry is not None else CollectorRegistry()
    prometheus.register(TelemetryCollector(telemetry))
    prometheus.register(
        DriftCollector(
            lambda: ((r.name, r.version, r.drift) for r in model_registry.ready_versions())
        )
    )
    dataplane = DataPlane(
        model_registry,
        telemetry.unresolved,
        keys=inference_keys if inference_keys.required else None,
        request_timeout_s=settings.request_timeout_s,
        images=ImageDecoder(
            settings.max_image_pixels,
            setting_ref("max_image_pixels", settings.max_image_pixels),
            usable_cpus(),
        ),
    )
    api = FastAPI(
        title="foldserve",
        version=__version__,
        # Served by routes/docs.py: /openapi.json behind the key, the pages only with `docs`.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # NOTE: no redirect from /x/ to /x: it names an http:// URL even behind TLS, and
        # no client needs it (/v2/, as the protocol's document writes it, is served as such).
        redirect_slashes=False,
    )
    api.openapi = lambda: openapi_document(api)  # type: ignore[method-assign]
    api.state.settings = settings
    api.state.draining = False  # set at SIGTERM/SIGINT: readiness answers 503 from then on
    api.state.prometheus = prometheus
    api.state.telemetry = telemetry
    api.state.model_registry = model_registry
    api.state.dataplane = dataplane
    api.state.inference_keys = inference_keys
    api.state.management_keys = management_keys
    guarded = [Depends(inference_key)]
    api.include_router(health.router)
    api.include_router(v2.health_router)
    api.include_router(metrics.router)
    api.include_router(drift.router, dependencies=guarded)  # before /models/{name}
    api.include_router(models.router, dependencies=guarded)
    # Before the V2 router: /v2/models/stats must not be taken for a model named "stats".
    api.include_router(stats.router, dependencies=guarded)
    api.include_router(v2.router, dependencies=guarded)
    api.include_router(repository.router)  # the management keys, checked by each route
    api.include_router(docs_router(settings))
    api.include_router(status_page.router)  # open: the page asks for the key its reads need
    api.add_exception_handler(FoldserveError, _foldserve_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected_error)
    inference = InferenceRoutes(dataplane, settings)
    return Service(settings, api, model_registry, telemetry, inference, inference_keys)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """foldserve's lines on stderr at ``level``, as text or one JSON object per line."""
    configure_root(level, log_format)


def warn_unknown_env(environ: Mapping[str, str]) -> list[str]:
    """Warn once about FOLDSERVE_* variables no setting reads (a typo is otherwise silent)."""
    unknown = unknown_env_names(environ)
    if unknown:
        log.warning("%s", unknown_env_message(unknown))
    return unknown


def app_from_env() -> Service:
    """A worker process's application: settings come from FOLDSERVE_* variables."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    warn_unknown_env(os.environ)
    return create_app(settings)


def _api_error(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> FastApiResponse:
    return FastApiResponse(
        error_body(message), status_code=status, headers=headers, media_type="application/json"
    )


async def _foldserve_error(_: Request, exc: Exception) -> FastApiResponse:
    assert isinstance(exc, FoldserveError)
    if exc.status >= 500:
        log.warning("%s (%d): %s", type(exc).__name__, exc.status, exc.logged())
    return _api_error(exc.status, exc.message, exc.headers())


async def _validation_error(request: Request, exc: Exception) -> FastApiResponse:
    assert isinstance(exc, RequestValidationError)
    # Framework validation (e.g. a non-integer version in the path) is invalid input like ours.
    parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return await _foldserve_error(request, InvalidInput("; ".join(parts) or "invalid request"))


async def _http_error(_: Request, exc: Exception) -> FastApiResponse:
    assert isinstance(exc, HTTPException)
    return _api_error(exc.status_code, str(exc.detail), exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> FastApiResponse:
    return _api_error(500, unexpected(exc, f"{request.method} {request.url.path}"))


async def _load_models(registry: Registry) -> None:
    await registry.load_all()
    # NOTE: the cyclic garbage collector's full passes walk every object the process holds
    # (frameworks, model sessions, manifests): at thousands of requests per second they were the
    # whole p99 (41 ms against a p50 of 5.5 ms, see docs/performance.md). Objects alive once the
    # models are loaded live as long as the process: freezing them takes them out of every pass.
    gc.collect()
    gc.freeze()


async def _watch_store(
    registry: Registry, loading: asyncio.Task[None], every_s: float | None, keys: Keys
) -> None:
    """Rescan the store on SIGHUP, and every ``every_s`` seconds if set, once loading is done;
    read the key file again each time (keys rotated in place)."""
    # NOTE: asyncio.wait, not an await of the task: a crash there is logged by its own
    # callback, and a cancellation of this watcher (shutdown) must still end it, even while
    # the models load (it was swallowed here, and the server never exited).
    await asyncio.wait([loading])
    hangup = asyncio.Event()
    _listen_for_sighup(hangup)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hangup.wait(), timeout=every_s)
        reason = "SIGHUP" if hangup.is_set() else f"every {every_s:g} s (poll_interval_s)"
        hangup.clear()
        log.debug("rescanning the model store: %s", reason)
        keys.reload()
        try:
            await registry.rescan()
        except Exception:
            log.exception("rescanning the model store failed; serving goes on")


def _listen_for_sighup(hangup: asyncio.Event) -> None:
    # NOTE: only the main thread may take signals (a server run in a thread, as in tests, can't).
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup.set)


def _stop_listening_for_sighup() -> None:
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("model loading crashed", exc_info=task.exception())
