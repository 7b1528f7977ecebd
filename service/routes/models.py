"""``/models``: every model version in the store, its status and, when it failed, why."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from service.errors import ModelNotFound
from service.registry import Registry
from service.schemas import ModelsAnswer, ModelVersions, documented
from service.verify import TOLERANCE_BASIS
from service.versions import Status, VersionRecord

router = APIRouter()


def registry_of(request: Request) -> Registry:
    registry: Registry = request.app.state.model_registry
    return registry


def describe(entry: VersionRecord) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": entry.name,
        "version": entry.version,
        "status": entry.status.value,
        "reason": entry.reason,
    }
    learned = entry.learned
    if learned.backend is not None:
        info.update(backend=learned.backend.format, device=learned.backend.device)
    report = learned.report
    if report is not None:
        info.update(
            golden_max_abs_diff=report.golden_max_abs_diff,
            batch_invariance_max_diff=report.batch_invariance_max_diff,
            tolerance={
                "golden": dataclasses.asdict(report.golden_tolerance),
                "batch_invariance": {
                    **dataclasses.asdict(report.invariance_tolerance),
                    "batch_sizes": report.invariance_batch_sizes,
                },
                "basis": TOLERANCE_BASIS,
            },
        )
    ready = entry.ready
    if ready is not None:
        info["batching"] = {**dataclasses.asdict(ready.batching), "inline": ready.batcher.inline}
        info["memory_bytes"] = learned.memory_bytes  # the RSS it added at load
    manifest = learned.manifest
    if manifest is not None:
        info.update(
            task=manifest.task,
            input_shape=manifest.inputs[0].shape,  # the first input's: kept for older clients
            inputs=[{"name": s.name, "shape": s.shape} for s in manifest.inputs],
            outputs=[{"name": s.name, "shape": s.shape} for s in manifest.outputs],
            labels=manifest.labels,
            image=None if manifest.image is None else manifest.image.model_dump(mode="json"),
        )
        claim = manifest.verification
        bits = learned.bitwise
        info["bitwise_batch_invariance"] = {
            # What the exporter measured on its runtime, then what this server measured on its
            # own: another runtime, version or device may sum in another order.
            "manifest": {
                "bitwise_batch_invariant": claim.bitwise_batch_invariant,
                "max_rows": claim.bitwise_max_rows,
            },
            "measured": None if bits is None else bits.invariant,
            "max_rows": None if bits is None else bits.max_rows,
            "note": bits.note if bits is not None else _unmeasured(entry),
        }
    return info


def _unmeasured(entry: VersionRecord) -> str:
    return "not measured yet" if entry.status is Status.LOADING else "not measured"


@router.get("/models", responses=documented(ModelsAnswer))
async def list_models(request: Request) -> Response:
    registry = registry_of(request)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for entry in registry.entries():
        by_name.setdefault(entry.name, []).append(describe(entry))
    body = {
        "default_model": registry.default_model,
        "aliases": registry.aliases,
        "models": [{"name": name, "versions": versions} for name, versions in by_name.items()],
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/models/{name}", responses=documented(ModelVersions, 404))
async def get_model(request: Request, name: str) -> Response:
    versions = [describe(e) for e in registry_of(request).entries() if e.name == name]
    if not versions:
        raise ModelNotFound(f"model {name[:64]!r} not found")
    return Response(
        orjson.dumps({"name": name, "versions": versions}), media_type="application/json"
    )
