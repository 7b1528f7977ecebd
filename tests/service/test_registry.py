"""The registry without HTTP: what loads, what stays out and why, and how names resolve."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.errors import ModelNotFound, ModelNotReady
from service.metrics import Metrics
from service.registry import Registry, Status
from service.settings import Settings
from tests.service.conftest import SHAPE, Artifacts, add_version


def registry_for(root: Path, **overrides: object) -> Registry:
    config = Settings(model_store=root, default_model="tiny", **overrides)  # type: ignore[arg-type]
    return Registry(config, Metrics(CollectorRegistry()))


def test_latest_ready_version_serves_when_a_newer_one_fails(
    tmp_path: Path, artifacts: Artifacts, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, artifacts)
    add_version(tmp_path, artifacts, golden_shift=1.0)

    async def main() -> None:
        registry = registry_for(tmp_path)
        with caplog.at_level(logging.INFO, logger="service.registry"):
            await registry.load_all()
        try:
            v1, v2 = registry.entries()
            assert v1.status is Status.READY and v1.report is not None
            assert v2.status is Status.FAILED and "golden outputs differ" in (v2.reason or "")
            assert registry.resolve(None, None) is v1
            assert registry.resolve("tiny", 1) is v1
            with pytest.raises(ModelNotReady, match="golden"):
                registry.resolve("tiny", 2)
            with pytest.raises(ModelNotFound, match="no version 3"):
                registry.resolve("tiny", 3)
            with pytest.raises(ModelNotFound, match="'nope' not found"):
                registry.resolve("nope", None)
            assert registry.readiness()[0] is True
        finally:
            await registry.stop()
        assert registry.entries()[0].status is Status.STOPPED
        assert registry.readiness()[0] is False

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert any("v1 verified" in m and "golden_diff" in m and "device=cpu" in m for m in lines)
    assert any("v2 (onnx) NOT served" in m for m in lines)


def test_a_manifest_without_the_chosen_format_fails_clearly(
    tmp_path: Path, artifacts: Artifacts
) -> None:
    add_version(tmp_path, artifacts, formats=("onnx",))

    async def main() -> None:
        registry = registry_for(tmp_path, backend="torchscript")
        await registry.load_all()
        (entry,) = registry.entries()
        assert entry.status is Status.FAILED
        assert "no torchscript file" in (entry.reason or "")
        ready, reason = registry.readiness()
        assert not ready and "no torchscript file" in reason

    asyncio.run(main())


def test_a_missing_store_is_not_ready_and_says_so(tmp_path: Path) -> None:
    async def main() -> None:
        registry = registry_for(tmp_path / "absent")
        await registry.load_all()
        assert registry.entries() == []
        ready, reason = registry.readiness()
        assert not ready and "'tiny' not found" in reason

    asyncio.run(main())


def test_ready_versions_answer_through_their_batcher(tmp_path: Path, artifacts: Artifacts) -> None:
    add_version(tmp_path, artifacts)

    async def main() -> None:
        registry = registry_for(tmp_path)
        await registry.load_all()
        try:
            entry = registry.resolve(None, None)
            assert entry.batcher is not None
            out = await entry.batcher.submit(artifacts.golden_inputs.reshape(-1, *SHAPE))
            np.testing.assert_array_equal(out, artifacts.golden_outputs)
        finally:
            await registry.stop()

    asyncio.run(main())
