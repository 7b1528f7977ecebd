"""The FastAPI routes' key checks (service.keys holds the keys and how they are compared)."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from service.keys import Keys


def inference_key(connection: HTTPConnection) -> None:
    """FastAPI dependency of the routes behind the inference key."""
    keys: Keys = connection.app.state.inference_keys
    keys.check_headers(connection.scope["headers"])


def metrics_key(connection: HTTPConnection) -> None:
    """FastAPI dependency of ``/metrics``: the inference key, with ``metrics_require_key``."""
    if connection.app.state.settings.metrics_require_key:
        inference_key(connection)
