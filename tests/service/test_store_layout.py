"""The store's layout rules: what counts as a version, atomic numbered writes, manifest sanity."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.store import (
    MANIFEST_FILE,
    STALE_STAGING_S,
    Manifest,
    list_versions,
    read_manifest,
    write_version,
)

SHIPPED = Path(__file__).resolve().parents[2] / "model_store" / "digits-mlp" / "1"


def shipped_manifest_dict() -> dict[str, Any]:
    return read_manifest(SHIPPED).model_dump()


def manifest_maker(name: str) -> Any:
    base = shipped_manifest_dict()

    def make(version: int, digests: dict[str, str]) -> Manifest:
        files = [
            {"format": "onnx", "path": f, "sha256": d, "size_bytes": 1} for f, d in digests.items()
        ]
        return Manifest.model_validate({**base, "name": name, "version": version, "files": files})

    return make


def test_only_plain_integer_folders_with_a_manifest_are_versions(tmp_path: Path) -> None:
    model = tmp_path / "m"
    for folder in ("2", "01", "²", ".staging-abc", "3", "x"):
        (model / folder).mkdir(parents=True)
    for folder in ("2", "01", "²", ".staging-abc"):
        (model / folder / MANIFEST_FILE).write_text("{}")
    assert list_versions(tmp_path, "m") == [2]


def test_write_picks_the_next_free_number_past_stray_folders(tmp_path: Path) -> None:
    model = tmp_path / "m"
    (model / "²").mkdir(parents=True)
    (model / "4").mkdir()  # a half-made version 4 (no manifest) still blocks its number
    path = write_version(tmp_path, "m", {"model.onnx": b"abc"}, manifest_maker("m"))
    assert path.name == "5"
    assert read_manifest(path).version == 5
    assert list_versions(tmp_path, "m") == [5]


def test_concurrent_writers_never_share_a_version(tmp_path: Path) -> None:
    made: list[Path] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        path = write_version(tmp_path, "m", {"model.onnx": bytes([i])}, manifest_maker("m"))
        with lock:
            made.append(path)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(int(p.name) for p in made) == list(range(1, 9))
    contents = {(p / "model.onnx").read_bytes() for p in made}
    assert len(contents) == 8  # each version holds its own writer's file
    assert not list((tmp_path / "m").glob(".staging-*"))


def test_versions_are_readable_by_other_users(tmp_path: Path) -> None:
    path = write_version(tmp_path, "m", {"model.onnx": b"abc"}, manifest_maker("m"))
    assert stat.S_IMODE(path.stat().st_mode) & 0o055 == 0o055


def test_stale_staging_folders_are_swept_and_fresh_ones_kept(tmp_path: Path) -> None:
    model = tmp_path / "m"
    stale, fresh = model / ".staging-dead", model / ".staging-live"
    stale.mkdir(parents=True)
    fresh.mkdir()
    old = time.time() - STALE_STAGING_S - 60
    os.utime(stale, (old, old))
    write_version(tmp_path, "m", {"model.onnx": b"abc"}, manifest_maker("m"))
    assert not stale.exists()
    assert fresh.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": ["a", "b"]}, "labels"),
        (
            {"outputs": [{"name": "logits", "shape": [3]}], "labels": ["a", "b", "c"]},
            "golden output",
        ),
        ({"inputs": [{"name": "input", "shape": [63]}]}, "golden input"),
        ({"golden": {"inputs": [], "outputs": []}}, "golden"),
    ],
)
def test_manifest_parts_must_agree(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate({**shipped_manifest_dict(), **change})


def test_manifest_file_paths_stay_inside_the_version() -> None:
    data = shipped_manifest_dict()
    data["files"][0]["path"] = "../other/model.onnx"
    with pytest.raises(ValidationError, match="path"):
        Manifest.model_validate(data)


def test_manifest_tolerances_are_bounded() -> None:
    data = shipped_manifest_dict()
    data["verification"]["atol"] = 1.0
    with pytest.raises(ValidationError, match="atol"):
        Manifest.model_validate(data)
