"""The app factory: wires settings, metrics, registry and dataplane; renders every error once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from service import __version__
from service.dataplane import DataPlane
from service.drift_metrics import DriftCollector
from service.errors import FoldserveError, InvalidInput
from service.logs import LogFormat, configure_root
from service.metrics import Metrics
from service.registry import Registry
from service.request_context import RequestLog
from service.routes import drift, health, metrics, models, repository, stats, status_page, v2
from service.routes.access import Keys, inference_key
from service.routes.asgi import RawRoutes
from service.routes.docs import docs_router, openapi_document
from service.routes.predict import PredictRoutes
from service.routes.responses import error_body, unexpected
from service.routes.v2 import V2Routes
from service.settings import Settings, unknown_env_message, unknown_env_names

log = logging.getLogger(__name__)


class FoldserveApp(FastAPI):
    """FastAPI with the inference routes answered before its middleware stack.

    NOTE: every FastAPI request passes its error, telemetry and body-limit middleware and its
    dependency solver; for a model answering in microseconds those cost more than the model.
    The inference routes (``/predict``, V2 ``infer``) skip them and render errors the same way.
    """

    def __init__(
        self, raw_routes: Sequence[RawRoutes], request_log: RequestLog | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.raw_routes = tuple(raw_routes)
        self.request_log = request_log  # X-Request-ID and the access log; None: neither

    def openapi(self) -> dict[str, Any]:
        return openapi_document(self)  # FastAPI's routes and the raw ones, with the keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.request_log is not None:
            await self.request_log(self._route, scope, receive, send)
        else:
            await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        for routes in self.raw_routes:
            if await routes.handle(scope, receive, send):
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FoldserveApp:
    """Build an app; models load in the background at startup so liveness answers meanwhile.

    Raises ConfigError when ``api_key_file`` cannot be read or holds no key.
    """
    inference_keys = Keys("api_key", settings.api_key, settings.api_key_file)
    management_keys = Keys("management_api_key", settings.management_api_key)
    app_metrics = Metrics(
        registry if registry is not None else CollectorRegistry(), settings.metrics_dir
    )
    model_registry = Registry(settings, app_metrics)
    app_metrics.watch_stages(
        lambda: ((e.name, e.version, e.stats) for e in model_registry.entries() if e.batcher)
    )
    app_metrics.registry.register(
        DriftCollector(lambda: ((e.name, e.version, e.drift) for e in model_registry.entries()))
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        model_registry.scan()
        loading = asyncio.create_task(_load_models(model_registry), name="foldserve-load")
        loading.add_done_callback(_log_crash)
        if settings.load_before_serving:
            # uvicorn accepts connections only once startup is over: until then they wait in
            # the socket's queue rather than get 503 "loading".
            await asyncio.shield(loading)
        watching = asyncio.create_task(
            _watch_store(model_registry, loading, settings.poll_interval_s, inference_keys),
            name="foldserve-watch",
        )
        watching.add_done_callback(_log_crash)
        try:
            yield
        finally:
            _stop_listening_for_sighup()
            for task in (watching, loading):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await model_registry.stop()  # drains: every accepted request is answered
            gc.unfreeze()  # what was frozen at load may be garbage now (e.g. this app, in tests)

    dataplane = DataPlane(model_registry, app_metrics, request_timeout_s=settings.request_timeout_s)
    raw_keys = inference_keys if inference_keys.required else None  # None: not even a check
    app = FoldserveApp(
        (
            PredictRoutes(dataplane, settings.max_body_bytes, raw_keys),
            V2Routes(dataplane, settings.max_body_bytes, raw_keys),
        ),
        RequestLog(settings.access_log, settings.access_log_sample),
        title="foldserve",
        version=__version__,
        lifespan=lifespan,
        # Served by routes/docs.py: /openapi.json behind the key, the pages only with `docs`.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # NOTE: no redirect from /x/ to /x: it names an http:// URL even behind TLS, and
        # no client needs it (/v2/, as the protocol's document writes it, is served as such).
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.draining = False  # set at SIGTERM/SIGINT: readiness answers 503 from then on
    app.state.metrics = app_metrics
    app.state.model_registry = model_registry
    app.state.dataplane = dataplane
    app.state.inference_keys = inference_keys
    app.state.management_keys = management_keys
    guarded = [Depends(inference_key)]
    app.include_router(health.router)
    app.include_router(v2.health_router)
    app.include_router(metrics.router)
    app.include_router(drift.router, dependencies=guarded)  # before /models/{name}
    app.include_router(models.router, dependencies=guarded)
    # Before the V2 router: /v2/models/stats must not be taken for a model named "stats".
    app.include_router(stats.router, dependencies=guarded)
    app.include_router(v2.router, dependencies=guarded)
    app.include_router(repository.router)  # the management keys, checked by each route
    app.include_router(docs_router(settings))
    app.include_router(status_page.router)  # open: the page asks for the key its reads need
    app.add_exception_handler(FoldserveError, _foldserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def mark_draining(app: FastAPI) -> None:
    """The server is shutting down: readiness turns 503 so that no new traffic is sent here."""
    app.state.draining = True


def app_from_env() -> FoldserveApp:
    """Factory for ``uvicorn --factory`` worker processes: settings come from FOLDSERVE_* vars."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    warn_unknown_env(os.environ)
    return create_app(settings)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """foldserve's lines on stderr at ``level``, as text or one JSON object per line (uvicorn's
    follow the same format through ``service.server.uvicorn_options``)."""
    configure_root(level, log_format)


def warn_unknown_env(environ: Mapping[str, str]) -> list[str]:
    """Warn once about FOLDSERVE_* variables no setting reads (a typo is otherwise silent)."""
    unknown = unknown_env_names(environ)
    if unknown:
        log.warning("%s", unknown_env_message(unknown))
    return unknown


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    body = error_body(message)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def _foldserve_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, FoldserveError)
    if exc.status >= 500:
        log.warning("%s (%d): %s", type(exc).__name__, exc.status, exc.logged())
    return error_response(exc.status, exc.message, exc.headers())


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # Framework validation (e.g. a non-integer version in the path) is invalid input like ours.
    parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return await _foldserve_error(request, InvalidInput("; ".join(parts) or "invalid request"))


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    return error_response(500, unexpected(exc, f"{request.method} {request.url.path}"))


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
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.shield(loading)  # a crash there is logged by its own callback
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
