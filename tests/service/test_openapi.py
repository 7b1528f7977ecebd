"""/openapi.json documents every route, the inference ones (/predict, V2 infer) included, with
request and answer schemas that real requests and answers match."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, RootModel

from service import schemas
from service.app import create_app
from service.routes import drift, health, metrics, models, repository, stats, v2
from service.settings import Settings
from tests.service.conftest import SHAPE, Artifacts, add_version, serve

X = [[[0.25] * SHAPE[1]] * SHAPE[0]] * 2
V2 = {"inputs": [{"name": "x", "shape": [2, *SHAPE], "datatype": "FP32", "data": [0.25] * 32}]}
RAW_ROUTES = {
    ("post", "/predict"),
    ("post", "/models/{name}/predict"),
    ("post", "/models/{name}/versions/{version}/predict"),
    ("post", "/v2/models/{name}/infer"),
    ("post", "/v2/models/{name}/versions/{version}/infer"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, artifacts: Artifacts) -> Path:
    root = tmp_path_factory.mktemp("openapi") / "store"
    add_version(root, artifacts)
    return root


@pytest.fixture(scope="module")
def base(store: Path) -> Iterator[str]:
    settings = Settings(model_store=store, default_model="tiny", management_api=True)
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def document(base: str) -> dict[str, Any]:
    answer = httpx.get(f"{base}/openapi.json")
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def test_every_route_is_documented(document: dict[str, Any]) -> None:
    routers = [module.router for module in (drift, health, metrics, models, repository, stats, v2)]
    served = {
        (method.lower(), route.path)
        for router in [*routers, v2.health_router]
        for route in router.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods
    }
    documented = {(method, path) for path, ops in document["paths"].items() for method in ops}
    assert served | RAW_ROUTES == documented
    assert ("get", "/v2/models/stats") in documented
    assert ("post", "/v2/repository/index") in documented
    for operations in document["paths"].values():
        for operation in operations.values():
            assert "422" not in operation["responses"]  # foldserve answers 400 instead
            assert "200" in operation["responses"]


def schema_of(document: dict[str, Any], content: dict[str, Any]) -> str:
    ref: str = content["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


def test_the_raw_routes_have_request_and_answer_schemas(document: dict[str, Any]) -> None:
    for path, request, answer in [
        ("/predict", "PredictRequest", "PredictAnswer"),
        ("/models/{name}/versions/{version}/predict", "PredictRequest", "PredictAnswer"),
        ("/v2/models/{name}/infer", "InferRequest", "InferAnswer"),
        ("/v2/models/{name}/versions/{version}/infer", "InferRequest", "InferAnswer"),
    ]:
        operation = document["paths"][path]["post"]
        assert schema_of(document, operation["requestBody"]["content"]) == request
        assert schema_of(document, operation["responses"]["200"]["content"]) == answer
        for status in ("400", "404", "413", "503"):
            error = operation["responses"][status]["content"]
            assert schema_of(document, error) == "ErrorAnswer"
        if path.startswith("/v2"):  # binary tensors both ways
            assert "application/octet-stream" in operation["requestBody"]["content"]
            assert "application/octet-stream" in operation["responses"]["200"]["content"]
    schemas_ = document["components"]["schemas"]
    assert set(schemas_["InferRequest"]["required"]) == {"inputs"}
    assert set(schemas_["PredictRequest"]["required"]) == {"inputs"}
    assert schemas_["PredictRequest"]["additionalProperties"] is False
    assert "securitySchemes" not in document["components"]  # no key set: none asked


# (method, path, body, the documented model of the answer)
EXCHANGES: list[tuple[str, str, Any, type[BaseModel]]] = [
    ("POST", "/predict", {"inputs": X}, schemas.PredictAnswer),
    ("POST", "/models/tiny/versions/1/predict", {"inputs": X}, schemas.PredictAnswer),
    ("POST", "/v2/models/tiny/infer", {**V2, "id": "a"}, schemas.InferAnswer),
    ("GET", "/v2", None, schemas.ServerMetadata),
    ("GET", "/v2/health/live", None, schemas.LiveAnswer),
    ("GET", "/v2/health/ready", None, schemas.ReadyAnswer),
    ("GET", "/v2/models/tiny", None, schemas.ModelMetadata),
    ("GET", "/v2/models/tiny/ready", None, schemas.ModelReadyAnswer),
    ("GET", "/v2/models/tiny/config", None, schemas.ModelConfig),
    ("GET", "/v2/models/stats", None, schemas.ModelStatsAnswer),
    ("GET", "/v2/models/tiny/versions/1/stats", None, schemas.ModelStatsAnswer),
    ("POST", "/v2/repository/index", None, schemas.RepositoryIndex),
    ("GET", "/models", None, schemas.ModelsAnswer),
    ("GET", "/models/tiny", None, schemas.ModelVersions),
    ("GET", "/healthz", None, schemas.Liveness),
    ("GET", "/readyz", None, schemas.Readiness),
    ("POST", "/predict", {"inputs": [[1.0]]}, schemas.ErrorAnswer),
    ("GET", "/v2/models/nope", None, schemas.ErrorAnswer),
]


@pytest.mark.parametrize(("method", "path", "body", "model"), EXCHANGES)
def test_real_requests_and_answers_match_their_schemas(
    base: str, method: str, path: str, body: Any, model: type[BaseModel]
) -> None:
    if body is not None:
        request_model = schemas.InferRequest if path.startswith("/v2") else schemas.PredictRequest
        request_model.model_validate(body)
    answer = httpx.request(method, base + path, json=body)
    assert (answer.status_code == 200) is (model is not schemas.ErrorAnswer), answer.text
    model.model_validate(answer.json())
    if not issubclass(model, RootModel):
        # strict: an answer holding a field the schema does not name fails too
        config = {**model.model_config, "extra": "forbid"}
        type("Strict", (model,), {"model_config": config}).model_validate(answer.json())


def test_with_a_key_the_document_says_which_operations_need_it(store: Path) -> None:
    settings = Settings(
        model_store=store,
        default_model="tiny",
        api_key="a-key",
        management_api=True,
        management_api_key="m-key",
    )
    document = create_app(settings).openapi()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            open_ = path in {"/healthz", "/readyz", "/metrics"} or path.startswith("/v2/health")
            assert ("security" in operation) is not open_, path
            assert ("401" in operation["responses"]) is not open_, path
