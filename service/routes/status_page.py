"""The status page: ``GET /`` and its assets under ``/ui/``, and the BN report the page shows.

The page is static (``service/static/``, shipped as package data): a script reads the server's own
endpoints (``/models``, ``/metrics``, ``/models/{name}/drift``, ``/models/{name}/predict``) from
the browser. The page and its assets are open, so a browser can load them without a key; every
endpoint they read is guarded as usual, and the page asks for the key on a 401.

Nothing here is in the OpenAPI document: it is a page for people, not an API for clients.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from service.errors import FoldserveError
from service.routes.access import inference_key
from service.routes.models import registry_of
from service.versions import VersionRecord

router = APIRouter(include_in_schema=False)

# Every file the page may ask for, by name: no path from the URL ever reaches the filesystem.
# The script is native ES modules (no build step): the entry status.js and the modules it imports,
# each served as JavaScript, as module scripts must be.
_SCRIPT = "text/javascript; charset=utf-8"
_ASSETS = {
    "status.js": _SCRIPT,
    "state.js": _SCRIPT,
    "dom.js": _SCRIPT,
    "http.js": _SCRIPT,
    "models.js": _SCRIPT,
    "metrics.js": _SCRIPT,
    "charts.js": _SCRIPT,
    "live.js": _SCRIPT,
    "drift.js": _SCRIPT,
    "pad.js": _SCRIPT,
    "digits.js": _SCRIPT,
    "images.js": _SCRIPT,
    "status.css": "text/css; charset=utf-8",
}
# NOTE: 'self' only: a page that loaded a script or a font from elsewhere would fail here, loudly.
_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidated on every load: a new release shows at once
    "Content-Security-Policy": _POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def _asset(name: str) -> bytes:
    """A file of ``service/static``, read once (lazily: nothing is read at import)."""
    return resources.files("service").joinpath("static", name).read_bytes()


@router.get("/")
async def page() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise FoldserveError(f"the status page has no file {name!r}", status=404)
    return Response(_asset(name), media_type=media_type, headers=_HEADERS)


@router.get("/ui/api/batch-norm", dependencies=[Depends(inference_key)])
async def batch_norm_report(request: Request) -> Response:
    """Where each BatchNorm layer went, and what the exporter proved, per model version: the
    parts of each manifest that ``/models`` leaves out."""
    versions = [_report(entry) for entry in registry_of(request).entries()]
    return Response(orjson.dumps({"versions": versions}), media_type="application/json")


def _report(entry: VersionRecord) -> dict[str, Any]:
    info: dict[str, Any] = {"name": entry.name, "version": entry.version}
    manifest = entry.learned.manifest
    if manifest is None:  # not loaded (yet), or its manifest could not be read
        return info
    provenance = manifest.provenance
    info.update(
        architecture=manifest.architecture,
        batch_norm=[
            record.model_dump(mode="json", include={"name", "features", "placement", "target"})
            for record in manifest.batch_norm
        ],
        exporter=manifest.verification.model_dump(mode="json"),
        provenance={
            "entry_point": provenance.entry_point,
            "fold_path": provenance.fold_path,
            "bn_stats": provenance.bn_stats,
            "dataset": provenance.dataset,
            "accuracy_population": provenance.accuracy_population,
            "accuracy_ema": provenance.accuracy_ema,
        },
    )
    return info
