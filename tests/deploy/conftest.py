"""Paths and loaders shared by the deployment checks: the images, the manifests, the dashboard.

Kept light on imports: scripts/gpu-check runs tests/deploy/test_gpu.py in a venv that has the
serving install, pytest and httpx, and neither PyYAML nor torch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
GPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
KUBERNETES = ROOT / "deploy" / "kubernetes"
DASHBOARD = KUBERNETES / "monitoring" / "grafana-dashboard.json"
STORE = ROOT / "model_store"


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file (a manifest may hold several)."""
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def load_script(name: str, path: Path) -> ModuleType:
    """Import a script that is not in a package (scripts/gpu_check.py) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up by name.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# service/cli.py: the --workers supervisor allows each worker shutdown_grace_s for its connections
# and request_timeout_s for its batchers, plus 10 s, before it kills it.
SUPERVISOR_MARGIN_S = 10


def drain_bound_s(settings: Settings) -> float:
    """The longest a stopping server takes before it exits (with workers: before it kills one)."""
    return settings.shutdown_grace_s + settings.request_timeout_s + SUPERVISOR_MARGIN_S
