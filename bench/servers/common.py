"""What the baseline servers share: the model store, golden data and uvicorn's options."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

STORE = Path(__file__).resolve().parents[2] / "model_store"
MODELS = ("digits-mlp", "digits-cnn")


def manifest(name: str, version: int = 1) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((STORE / name / str(version) / "manifest.json").read_text())
    return data


def onnx_path(name: str, version: int = 1) -> Path:
    return STORE / name / str(version) / "model.onnx"


def uvicorn_options(port: int) -> dict[str, Any]:
    """The same event loop, HTTP parser and uvicorn options foldserve uses: only the app differs."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "log_level": "warning",
        "access_log": False,
        "proxy_headers": False,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }
