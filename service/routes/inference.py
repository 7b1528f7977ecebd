"""Which requests are inference requests, and which protocol reads them.

``POST /predict``, ``/models/{name}[/versions/{v}]/predict`` (foldserve's JSON) and
``/v2/models/{name}[/versions/{v}]/infer`` (the Open Inference Protocol) go straight to the
dataplane: for a model answering in microseconds, a framework's per-request machinery (routing
tables, dependency solving, middleware) would cost more than the model.
"""

from __future__ import annotations

from collections.abc import Awaitable

from service.dataplane import Codec, DataPlane
from service.http.request import Request
from service.http.response import Response, answered, error_response
from service.routes.predict import PredictCodec
from service.routes.v2 import V2Codec
from service.settings import Settings

Target = tuple[Codec, str | None, str | None]  # the codec, and the model and version named


class InferenceRoutes:
    def __init__(self, dataplane: DataPlane, settings: Settings) -> None:
        self._dataplane = dataplane
        self._predict = PredictCodec(settings)
        self._v2 = V2Codec(settings)

    def match(self, path: str) -> Target | None:
        if path == "/predict":
            return self._predict, None, None
        if path.endswith("/predict") and path.startswith("/models/"):
            named = _named(path[len("/models/") : -len("/predict")])
            return None if named is None else (self._predict, *named)
        if path.endswith("/infer") and path.startswith("/v2/models/"):
            named = _named(path[len("/v2/models/") : -len("/infer")])
            return None if named is None else (self._v2, *named)
        return None

    def handle(self, request: Request, target: Target) -> Awaitable[Response]:
        """The request's answer, as the dataplane's own coroutine (no frame of this one)."""
        if request.method != "POST":
            message = f"method {request.method} not allowed here: use POST"
            return answered(error_response(405, message, [(b"allow", b"POST")]))
        codec, name, version = target
        return self._dataplane.serve(request, codec, name, version)


def _named(middle: str) -> tuple[str, str | None] | None:
    """``{name}`` or ``{name}/versions/{v}``, each part non-empty and free of '/'."""
    parts = middle.split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None
