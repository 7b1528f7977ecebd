"""The OpenAPI document (every route, the dataplane's inference routes included) and, with
``docs``, its pages.

``/openapi.json`` is always served. With ``api_key`` it needs the key, unless ``docs`` is on: it
lists the protected routes and the server's version (a fingerprint for anyone scanning for a
vulnerable release), and everyone entitled to use the API has a key anyway. ``docs`` is the
operator's choice to publish the documentation, and the pages' browser fetch carries no key.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from service.keys import Keys
from service.schemas import InferAnswer, InferRequest, PredictAnswer, PredictRequest, documented
from service.settings import Settings

OPENAPI_PATH = "/openapi.json"
# Always open: probes, and the document itself is guarded by its own rule (above).
_OPEN = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})

# ---------------------------------------------------------------- the inference routes
# NOTE: served ahead of FastAPI (routes/predict.py, routes/v2.py), so FastAPI does not know them.
# These signatures describe them to its schema generator; they are never registered or called.

_ERRORS = (400, 401, 404, 413, 415, 503, 504)
_OCTET_STREAM = {
    "application/octet-stream": {
        "schema": {"type": "string", "format": "binary"},
        "description": "binary tensors: the JSON header (its length in the header "
        "Inference-Header-Content-Length), then each binary input's raw little-endian bytes",
    }
}


async def predict(body: PredictRequest) -> PredictAnswer:
    """Predict with the default model (or the one the body names)."""
    raise NotImplementedError  # documentation only


async def model_predict(name: str, body: PredictRequest) -> PredictAnswer:
    """Predict with a model's default version."""
    raise NotImplementedError


async def version_predict(name: str, version: str, body: PredictRequest) -> PredictAnswer:
    """Predict with one version of a model."""
    raise NotImplementedError


async def infer(name: str, body: InferRequest) -> InferAnswer:
    """Open Inference Protocol inference, JSON or binary tensors; joins the same batches as
    /predict."""
    raise NotImplementedError


async def version_infer(name: str, version: str, body: InferRequest) -> InferAnswer:
    """Open Inference Protocol inference with one version of a model."""
    raise NotImplementedError


_IMAGES = {
    kind: {
        "schema": {"type": "string", "format": "binary"},
        "description": "one image for a model exported with its image preprocessing",
    }
    for kind in ("image/png", "image/jpeg")
}


def _raw_routes() -> list[APIRoute]:
    infer_extra = {
        "requestBody": {"content": _OCTET_STREAM},
        "responses": {"200": {"content": _OCTET_STREAM}},
    }
    images = {"requestBody": {"content": _IMAGES}}
    errors = documented(None, *_ERRORS)
    return [
        APIRoute("/predict", predict, methods=["POST"], responses=errors, openapi_extra=images),
        APIRoute(
            "/models/{name}/predict",
            model_predict,
            methods=["POST"],
            responses=errors,
            openapi_extra=images,
        ),
        APIRoute(
            "/models/{name}/versions/{version}/predict",
            version_predict,
            methods=["POST"],
            responses=errors,
            openapi_extra=images,
        ),
        APIRoute(
            "/v2/models/{name}/infer",
            infer,
            methods=["POST"],
            responses=errors,
            openapi_extra=infer_extra,
        ),
        APIRoute(
            "/v2/models/{name}/versions/{version}/infer",
            version_infer,
            methods=["POST"],
            responses=errors,
            openapi_extra=infer_extra,
        ),
    ]


# ---------------------------------------------------------------- the document


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, built once: FastAPI's routes, the raw routes, the keys."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    settings: Settings = app.state.settings
    document = get_openapi(
        title=app.title,
        version=app.version,
        description="foldserve: a prediction never depends on what else shares its batch.",
        routes=[*app.routes, *_raw_routes()],
    )
    inference: Keys = app.state.inference_keys
    management: Keys = app.state.management_keys
    schemes: dict[str, Any] = {}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            # NOTE: foldserve never answers 422: framework validation errors are 400s.
            if operation.get("responses", {}).pop("422", None) is not None:
                operation["responses"].setdefault("400", _error_response(document))
            keys = management if path.startswith("/v2/repository") else inference
            if path in _OPEN or (path == "/metrics" and not settings.metrics_require_key):
                continue
            if keys.required:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                operation["responses"].setdefault("401", _error_response(document))
                schemes = _SCHEMES
    components = document.setdefault("components", {})
    components.get("schemas", {}).pop("HTTPValidationError", None)
    components.get("schemas", {}).pop("ValidationError", None)
    if schemes:
        components["securitySchemes"] = schemes
    app.openapi_schema = document
    return document


_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def _error_response(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault(
        "ErrorAnswer",
        {
            "title": "ErrorAnswer",
            "type": "object",
            "properties": {"error": {"type": "string", "title": "Error"}},
            "required": ["error"],
        },
    )
    return {
        "description": "Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorAnswer"}}},
    }


# ---------------------------------------------------------------- the routes


def docs_router(settings: Settings) -> APIRouter:
    """``/openapi.json``, and ``/docs`` and ``/redoc`` when ``docs`` is on."""
    router = APIRouter(include_in_schema=False)

    @router.get(OPENAPI_PATH)
    async def document(request: Request) -> Response:
        if not settings.docs:
            keys: Keys = request.app.state.inference_keys
            keys.check_headers(request.scope["headers"])
        body = orjson.dumps(openapi_document(request.app))
        return Response(body, media_type="application/json")

    if settings.docs:

        @router.get("/docs")
        async def swagger() -> Response:
            return get_swagger_ui_html(openapi_url=OPENAPI_PATH, title="foldserve")

        @router.get("/redoc")
        async def redoc() -> Response:
            return get_redoc_html(openapi_url=OPENAPI_PATH, title="foldserve")

    return router
