"""The registry without HTTP: what loads, what stays out and why, and how names resolve."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import pytest

import service.loader as loader_module
import service.registry as registry_module
from service import verify
from service.errors import ModelNotFound, ModelNotReady
from service.registry import Registry
from service.settings import BatchingOverride, Settings
from service.store import BatchingConfig
from service.telemetry import LAYOUT, Telemetry
from service.versions import Status, VersionRecord
from tests.service.conftest import SHAPE, Artifacts, add_version


def registry_for(root: Path, **overrides: object) -> Registry:
    config = Settings(model_store=root, default_model="tiny", **overrides)  # type: ignore[arg-type]
    return Registry(config, Telemetry())


def test_latest_ready_version_serves_when_a_newer_one_fails(
    tmp_path: Path, artifacts: Artifacts, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, artifacts)
    add_version(tmp_path, artifacts, golden_shift=1.0)

    async def main() -> None:
        registry = registry_for(tmp_path)
        with caplog.at_level(logging.INFO):
            await registry.load_all()
        try:
            v1, v2 = registry.entries()
            assert v1.status is Status.READY and v1.learned.report is not None
            assert v2.status is Status.FAILED and "golden outputs differ" in (v2.reason or "")
            assert registry.resolve(None, None) is v1.ready
            assert registry.resolve("tiny", 1) is v1.ready
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
        registry = registry_for(tmp_path, backend="torchscript", allow_torchscript=True)
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
        assert not ready and "the default model 'tiny' is not loaded" in reason

    asyncio.run(main())


def test_ready_versions_answer_through_their_batcher(tmp_path: Path, artifacts: Artifacts) -> None:
    add_version(tmp_path, artifacts)

    async def main() -> None:
        registry = registry_for(tmp_path)
        await registry.load_all()
        try:
            entry = registry.resolve(None, None)
            out = await entry.batcher.submit(artifacts.golden_inputs.reshape(-1, *SHAPE))
            np.testing.assert_array_equal(out, artifacts.golden_outputs)
        finally:
            await registry.stop()

    asyncio.run(main())


def test_a_version_whose_load_raises_fails_alone(
    tmp_path: Path,
    artifacts: Artifacts,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    add_version(tmp_path, artifacts)
    add_version(tmp_path, artifacts, name="other")
    add_version(tmp_path, artifacts, name="third")
    real_load, real_serve = loader_module._load, Registry._serve

    def load(*args: Any) -> object:
        if args[2] == "tiny":  # loaded first: the default model
            raise RuntimeError("disk on fire")
        return real_load(*args)

    def serve(self: Registry, record: VersionRecord, loaded: Any) -> object:
        if record.name == "other":
            raise ValueError("no batcher today")
        return real_serve(self, record, loaded)

    monkeypatch.setattr(loader_module, "_load", load)
    monkeypatch.setattr(Registry, "_serve", serve)

    async def main() -> None:
        registry = registry_for(tmp_path)
        await registry.load_all()
        try:
            status = {e.name: (e.status, e.reason) for e in registry.entries()}
            # What a client may read names no exception: its text may hold paths or internals.
            unexpected = "unexpected error (details in the server log)"
            assert status == {
                "tiny": (Status.FAILED, unexpected),
                "other": (Status.FAILED, unexpected),
                "third": (Status.READY, None),
            }
            ready, reason = registry.readiness()
            assert not ready and unexpected in reason
            assert "RuntimeError: disk on fire" in caplog.text  # the log has the whole story
            assert "ValueError: no batcher today" in caplog.text
        finally:
            await registry.stop()
        assert [e.status for e in registry.entries()] == [
            Status.FAILED,
            Status.STOPPED,
            Status.FAILED,
        ]

    asyncio.run(main())


def test_a_crash_of_the_loading_loop_leaves_no_version_loading(
    tmp_path: Path, artifacts: Artifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("tiny", "other", "third"):
        add_version(tmp_path, artifacts, name=name)
    real_load_one = Registry._load_one

    async def load_one(self: Registry, entry: VersionRecord) -> None:
        if entry.name == "other":  # a bug outside any one version's load
            raise RuntimeError("loop bug")
        await real_load_one(self, entry)

    monkeypatch.setattr(Registry, "_load_one", load_one)

    async def main() -> None:
        registry = registry_for(tmp_path)
        with pytest.raises(RuntimeError, match="loop bug"):
            await registry.load_all()
        try:
            status = {e.name: (e.status, e.reason) for e in registry.entries()}
            assert status["tiny"] == (Status.READY, None)
            for name in ("other", "third"):
                assert status[name] == (
                    Status.FAILED,
                    "loading was interrupted: unexpected error (details in the server log)",
                )
        finally:
            await registry.stop()

    asyncio.run(main())


def test_loading_cancelled_midway_marks_the_rest_failed(
    tmp_path: Path, artifacts: Artifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_version(tmp_path, artifacts)
    add_version(tmp_path, artifacts, name="other")
    started, release = threading.Event(), threading.Event()
    real_verify = verify.verify_loaded_model

    def held(*args: Any) -> Any:
        started.set()
        assert release.wait(10)
        return real_verify(*args)

    monkeypatch.setattr(loader_module, "verify_loaded_model", held)

    async def main() -> None:
        registry = registry_for(tmp_path)
        loading = asyncio.create_task(registry.load_all())
        await asyncio.to_thread(started.wait, 10)  # "tiny" is mid-verification: cancel now
        loading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loading
        release.set()
        statuses = [(e.name, e.status, e.reason) for e in registry.entries()]
        assert statuses == [
            ("other", Status.FAILED, "loading was interrupted: cancelled"),
            ("tiny", Status.FAILED, "loading was interrupted: cancelled"),
        ]
        ready, reason = registry.readiness()
        assert not ready and "loading was interrupted" in reason
        await registry.stop()

    asyncio.run(main())


class _RecordingBatcher:
    """Stands in for Batcher: records the values the registry chose."""

    made: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, run: object, **kwargs: Any) -> None:
        assert kwargs.pop("stats") is not None  # every batcher counts into the telemetry
        self.kwargs = kwargs

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def test_batching_values_per_model_beat_global_ones_which_beat_the_manifest(
    tmp_path: Path, artifacts: Artifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = BatchingConfig(max_batch_size=64, max_delay_ms=5.0)
    for name in ("tiny", "cnn", "plain"):
        add_version(tmp_path, artifacts, name=name, batching=manifest)
    monkeypatch.setattr(registry_module, "Batcher", _RecordingBatcher)
    registry = registry_for(
        tmp_path,
        max_delay_ms=3.0,
        adaptive_delay=True,
        model_batching={
            "tiny": BatchingOverride(max_batch_size=32, max_delay_ms=1.0),
            "cnn": BatchingOverride(max_batch_size=8),  # its delay comes from the global value
        },
    )
    asyncio.run(registry.load_all())
    made = [cast(_RecordingBatcher, r.batcher) for r in registry.ready_versions()]
    chosen = {
        r.name: (b.kwargs["max_batch_size"], b.kwargs["max_delay_ms"])
        for r, b in zip(registry.ready_versions(), made, strict=True)
    }
    assert chosen == {"cnn": (8, 3.0), "plain": (64, 3.0), "tiny": (32, 1.0)}
    assert all(b.kwargs["adaptive_delay"] is True for b in made)


def test_a_per_model_cap_splits_batches_and_unknown_names_are_reported(
    tmp_path: Path, artifacts: Artifacts, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, artifacts)
    add_version(tmp_path, artifacts, name="other")
    rows = artifacts.golden_inputs.reshape(-1, *SHAPE)  # 8 rows in one request
    registry = registry_for(
        tmp_path,
        max_batch_size=100,
        model_batching={
            "tiny": BatchingOverride(max_batch_size=3),
            "tinny": BatchingOverride(max_batch_size=1),
        },
    )
    telemetry = registry._telemetry

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="service.registry"):
            await registry.load_all()
        try:
            for name in ("tiny", "other"):
                out = await registry.resolve(name, None).batcher.submit(rows)
                np.testing.assert_array_equal(out, artifacts.golden_outputs)
        finally:
            await registry.stop()

    asyncio.run(main())

    def batches(name: str) -> float:
        return telemetry.read()[(name, "1")].count(LAYOUT.batch_rows)

    assert batches("tiny") == 3  # 8 rows under a cap of 3: 3 + 3 + 2
    assert batches("other") == 1  # the global cap of 100
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "service.registry"]
    assert "'tinny'" in warning and "match no model" in warning and "other, tiny" in warning


@pytest.mark.parametrize(("inline_max_ms", "inline"), [(1000.0, True), (0.0, False)])
def test_a_model_runs_inline_only_when_a_full_batch_is_faster_than_the_setting(
    tmp_path: Path,
    artifacts: Artifacts,
    monkeypatch: pytest.MonkeyPatch,
    inline_max_ms: float,
    inline: bool,
) -> None:
    add_version(tmp_path, artifacts)
    monkeypatch.setattr(registry_module, "Batcher", _RecordingBatcher)
    registry = registry_for(tmp_path, inline_max_ms=inline_max_ms)
    asyncio.run(registry.load_all())
    (entry,) = registry.ready_versions()
    assert cast(_RecordingBatcher, entry.batcher).kwargs["inline"] is inline
