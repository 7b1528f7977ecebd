"""A store of one model or one version (KServe's /mnt/models) read as well as a whole store."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.errors import StoreError
from service.settings import Settings
from service.store import MANIFEST_FILE, open_store, read_manifest
from tests.service.conftest import SHIPPED_STORE, serve

MODEL = "digits-mlp"


@pytest.fixture
def one_model(tmp_path: Path) -> Path:
    """One model's folder, as a storage initializer copies ``.../digits-mlp`` to /mnt/models."""
    root = tmp_path / "models"
    shutil.copytree(SHIPPED_STORE / MODEL, root)
    return root


@pytest.fixture
def one_version(tmp_path: Path) -> Path:
    """One version's folder: the model files and manifest.json, nothing around them."""
    root = tmp_path / "models"
    shutil.copytree(SHIPPED_STORE / MODEL / "1", root)
    return root


def golden(root: Path) -> tuple[list[list[float]], np.ndarray]:
    manifest = read_manifest(root)
    return manifest.golden.inputs, np.asarray(manifest.golden.outputs, dtype=np.float32)


def test_a_whole_store_keeps_its_layout() -> None:
    view = open_store(SHIPPED_STORE)
    assert (view.layout, view.name) == ("store", None)
    assert view.models() == ["digits-cnn", "digits-mlp"]
    assert view.version_dir(MODEL, 1) == SHIPPED_STORE / MODEL / "1"


def test_one_models_folder_is_named_by_its_manifests(one_model: Path) -> None:
    shutil.copytree(one_model / "1", one_model / "3")
    manifest = json.loads((one_model / "3" / MANIFEST_FILE).read_text())
    (one_model / "3" / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 3}))
    (one_model / "2").mkdir()  # a number without a manifest is no version, as in a store
    view = open_store(one_model)
    assert (view.layout, view.name) == ("model", MODEL)
    assert view.models() == [MODEL]
    assert view.versions(MODEL) == [1, 3]
    assert view.versions("other") == []
    assert view.version_dir(MODEL, 3) == one_model / "3"
    with pytest.raises(StoreError, match="holds only model 'digits-mlp'"):
        view.version_dir("other", 1)


def test_one_versions_folder_is_named_and_numbered_by_its_manifest(one_version: Path) -> None:
    view = open_store(one_version)
    assert (view.layout, view.name, view.version) == ("version", MODEL, 1)
    assert view.versions(MODEL) == [1]
    assert view.version_dir(MODEL, 1) == one_version


def test_a_folder_that_is_two_layouts_at_once_is_refused(one_model: Path) -> None:
    shutil.copytree(SHIPPED_STORE / "digits-cnn", one_model / "digits-cnn")
    with pytest.raises(StoreError, match=r"version folders \[1\].*model folders \['digits-cnn'\]"):
        open_store(one_model)


def test_a_model_named_like_a_number_is_still_a_store(tmp_path: Path) -> None:
    # "1" is a valid model name: its folder holds versions, not a manifest.
    shutil.copytree(SHIPPED_STORE / MODEL, tmp_path / "1")
    assert open_store(tmp_path).layout == "store"


def test_a_single_version_with_a_broken_manifest_is_reported(
    one_version: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (one_version / MANIFEST_FILE).write_text("{}")
    with pytest.raises(StoreError, match="invalid manifest"):
        open_store(one_version)
    app = create_app(_settings(one_version))
    with caplog.at_level(logging.ERROR, logger="service.registry"), serve(app) as base:
        ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 503
    assert any("NOT served" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("layout", ["one_model", "one_version"])
def test_served_from_one_model_or_version_on_both_protocols(
    layout: str, request: pytest.FixtureRequest
) -> None:
    root: Path = request.getfixturevalue(layout)
    inputs, expected = golden(SHIPPED_STORE / MODEL / "1")
    with serve(create_app(_settings(root))) as base:
        assert httpx.get(f"{base}/readyz").status_code == 200
        predicted = httpx.post(f"{base}/predict", json={"inputs": inputs})
        v2 = httpx.post(
            f"{base}/v2/models/{MODEL}/infer",
            json={
                "inputs": [
                    {
                        "name": "input",
                        "shape": [len(inputs), len(inputs[0])],
                        "datatype": "FP32",
                        "data": [v for row in inputs for v in row],
                    }
                ]
            },
        )
    assert predicted.status_code == 200, predicted.text
    np.testing.assert_allclose(predicted.json()["outputs"], expected, atol=1e-4)
    assert v2.status_code == 200, v2.text
    out = v2.json()["outputs"][0]
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), expected, atol=1e-4)


def test_an_older_version_naming_another_model_fails_alone(one_model: Path) -> None:
    # The newest version names the model; an older one that names another is refused as a
    # store refuses a version filed under the wrong model's folder.
    manifest = json.loads((one_model / "1" / MANIFEST_FILE).read_text())
    shutil.copytree(one_model / "1", one_model / "2")
    (one_model / "2" / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 2}))
    (one_model / "1" / MANIFEST_FILE).write_text(json.dumps({**manifest, "name": "digits-cnn"}))
    with serve(create_app(_settings(one_model))) as base:
        versions = httpx.get(f"{base}/models").json()["models"][0]["versions"]
    status = {v["version"]: (v["status"], v["reason"] or "") for v in versions}
    assert status[2] == ("ready", "")
    assert status[1][0] == "failed" and "manifest says 'digits-cnn'" in status[1][1]


def _settings(root: Path) -> Settings:
    return Settings(model_store=root, default_model=MODEL)


def linked_like_kserve(source: Path, mount: Path) -> Path:
    """``mount`` as KServe's storage initializer lays out a local or PVC model: a link for each
    entry of the model's folder, pointing into it (``Storage._download_local``)."""
    mount.mkdir()
    for entry in source.iterdir():
        (mount / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return mount


def v2_infer(base: str, name: str, inputs: list[list[float]]) -> httpx.Response:
    tensor = {
        "name": "input",
        "shape": [len(inputs), len(inputs[0])],
        "datatype": "FP32",
        "data": [v for row in inputs for v in row],
    }
    return httpx.post(f"{base}/v2/models/{name}/infer", json={"inputs": [tensor]})


@pytest.mark.parametrize("layout", ["one_model", "one_version"])
def test_kserves_linked_layout_serves_under_the_inferenceservices_name(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Path = request.getfixturevalue(layout)  # what the PVC holds
    mount = linked_like_kserve(source, tmp_path / "mnt-models")
    inputs, expected = golden(SHIPPED_STORE / MODEL / "1")
    # The InferenceService is called "digits", the manifest "digits-mlp": the runtime passes
    # --default-model={{.Name}}, and the store's only model answers to both.
    with serve(create_app(Settings(model_store=mount, default_model="digits"))) as base:
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200
        assert httpx.get(f"{base}/v2/models/digits/ready").status_code == 200
        by_isvc, by_manifest = v2_infer(base, "digits", inputs), v2_infer(base, MODEL, inputs)
        models = httpx.get(f"{base}/models").json()
    for answer in (by_isvc, by_manifest):
        assert answer.status_code == 200, answer.text
        out = answer.json()["outputs"][0]
        np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), expected, atol=1e-4)
    assert models["aliases"] == {"digits": MODEL} and models["default_model"] == "digits"
    assert [m["name"] for m in models["models"]] == [MODEL]


def test_a_link_inside_the_linked_model_that_leaves_it_is_still_refused(
    one_model: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere.onnx"
    shutil.copy(one_model / "1" / "model.onnx", elsewhere)  # the same bytes: only where differs
    (one_model / "1" / "model.onnx").unlink()
    (one_model / "1" / "model.onnx").symlink_to(elsewhere)
    mount = linked_like_kserve(one_model, tmp_path / "mnt-models")
    with serve(create_app(Settings(model_store=mount, default_model=MODEL))) as base:
        ready = httpx.get(f"{base}/v2/health/ready")
        (model,) = httpx.get(f"{base}/models").json()["models"]
    assert ready.status_code == 503
    (version,) = model["versions"]
    assert version["status"] == "failed"
    assert "model.onnx resolves outside the model store" in version["reason"]


def test_a_missing_default_model_can_leave_the_server_up_and_unready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(
        model_store=SHIPPED_STORE, default_model="digits-resnet", missing_model="unready"
    )
    inputs, _ = golden(SHIPPED_STORE / MODEL / "1")
    caplog.set_level(logging.INFO)
    with serve(create_app(settings)) as base:
        ready = httpx.get(f"{base}/readyz")
        named = v2_infer(base, MODEL, inputs)
        unnamed = httpx.post(f"{base}/predict", json={"inputs": inputs})
        more = [httpx.post(f"{base}/predict", json={"inputs": inputs}) for _ in range(30)]
    assert all(r.status_code == 503 for r in more)
    # 31 refusals, one line: the rest are counted (every 10 s, and in /metrics by code).
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if "digits-resnet" in m and ("503" in m or "not answered" in m)]
    assert len(lines) == 1, lines
    assert ready.status_code == 503
    assert "the default model 'digits-resnet' is not loaded" in ready.json()["reason"]
    assert named.status_code == 200  # the others serve
    assert unnamed.status_code == 503 and "Retry-After" in unnamed.headers


def test_a_refused_version_is_logged_once_not_at_every_rescan(
    one_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(one_model / "1", elsewhere)
    store = tmp_path / "store"
    (store / MODEL).mkdir(parents=True)
    shutil.copytree(one_model / "1", store / MODEL / "1")
    (store / MODEL / "2").symlink_to(elsewhere, target_is_directory=True)  # a link below the top
    manifest = json.loads((elsewhere / MANIFEST_FILE).read_text())
    (elsewhere / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": 2}))
    caplog.set_level(logging.INFO)
    settings = Settings(model_store=store, default_model=MODEL, poll_interval_s=0.05)
    with serve(create_app(settings)) as base:
        time.sleep(0.6)  # a dozen rescans
        (model,) = httpx.get(f"{base}/models").json()["models"]
    refused = [
        r for r in caplog.records if "NOT served" in r.getMessage() and "v2" in r.getMessage()
    ]
    assert len(refused) == 1, [r.getMessage() for r in refused]
    assert any(v["version"] == 2 and v["status"] == "failed" for v in model["versions"])
