"""The product's promise end to end: models using batch statistics stay out, folded ones serve
every sample the same answer whatever shares its batch."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.app import create_app
from service.backends import BackendOptions
from service.backends.onnx import OnnxBackend
from service.settings import Settings
from service.store import read_manifest, version_dir
from service.verify import check_golden
from tests.service.conftest import (
    CLASSES,
    Artifacts,
    add_version,
    export_artifacts,
    serve,
)
from tests.service.test_app_e2e import metric_samples, outputs, samples


class CentredOnTheBatch(torch.nn.Module):
    """Normalizes with the batch mean but holds no BatchNorm: only batch invariance catches it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(x - x.mean(0, keepdim=True))  # every sample moves with n
        return out


@pytest.fixture(scope="module")
def batch_statistics_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifacts]:
    torch.manual_seed(0)
    unfolded = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(16, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, len(CLASSES)),
    ).train()  # exported as in training: the BN normalizes with the batch it is given
    out = tmp_path_factory.mktemp("batch-statistics")
    return {
        "bn-train": export_artifacts(unfolded, out / "bn-train", training=True),
        "centred": export_artifacts(CentredOnTheBatch().eval(), out / "centred"),
    }


def test_models_normalizing_with_batch_statistics_are_kept_out(
    tmp_path: Path, artifacts: Artifacts, batch_statistics_models: dict[str, Artifacts]
) -> None:
    root = tmp_path / "store"
    for name, art in batch_statistics_models.items():
        add_version(root, art, name=name, formats=("onnx",))
    add_version(root, artifacts)
    # The premise: the manifests are right (golden outputs match), so only the checks for batch
    # statistics can keep these models out.
    for name in batch_statistics_models:
        directory = version_dir(root, name, 1)
        backend = OnnxBackend(directory / "model.onnx", BackendOptions(device="cpu"))
        check_golden(backend, read_manifest(directory))
    settings = Settings(model_store=root, default_model="bn-train")
    with serve(create_app(settings)) as base:
        ready = httpx.get(f"{base}/readyz")
        listed = {m["name"]: m["versions"][0] for m in httpx.get(f"{base}/models").json()["models"]}
        refused = httpx.post(f"{base}/predict", json={"inputs": samples(2, seed=0).tolist()})
        centred = httpx.post(
            f"{base}/models/centred/predict", json={"inputs": samples(2, seed=0).tolist()}
        )
        other = httpx.post(f"{base}/models/tiny/predict", json={"inputs": samples(2, 0).tolist()})
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert "BatchNormalization" in ready.json()["reason"]
    assert listed["bn-train"]["status"] == "failed"
    assert "batch-statistics ops: BatchNormalization" in listed["bn-train"]["reason"]
    assert listed["centred"]["status"] == "failed"
    assert "normalizes with batch statistics" in listed["centred"]["reason"]
    assert listed["tiny"]["status"] == "ready"
    assert refused.status_code == 503 and "BatchNormalization" in refused.json()["error"]
    assert centred.status_code == 503 and "batch statistics" in centred.json()["error"]
    assert other.status_code == 200


def wild_mates(manifest_inputs: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """Real samples rescaled over six orders of magnitude, shifted, or replaced by noise."""
    picks = manifest_inputs[rng.integers(len(manifest_inputs), size=count)]
    scale = 10.0 ** rng.uniform(-3, 3, size=(count,) + (1,) * (picks.ndim - 1))
    noise = rng.normal(0.0, 8.0, size=picks.shape)
    mates = np.where(rng.random(size=(count,) + (1,) * (picks.ndim - 1)) < 0.3, noise, picks)
    return (mates * scale + rng.uniform(-20, 20)).astype(np.float32)


@pytest.mark.parametrize("model", ["digits-mlp", "digits-cnn"])
def test_a_probe_is_the_same_alone_and_among_wild_batch_mates_on_a_folded_bn_model(
    shipped_store: Path, model: str
) -> None:
    manifest = json.loads((shipped_store / model / "1" / "manifest.json").read_text())
    assert manifest["batch_norm"], "the premise: a real network trained with BatchNorm"
    shape = tuple(manifest["inputs"][0]["shape"])
    inputs = np.asarray(manifest["golden"]["inputs"], dtype=np.float32).reshape(-1, *shape)
    probe = inputs[:1]
    rng = np.random.default_rng(8)
    rounds, mates_per_round = 4, 24

    async def among_mates(client: httpx.AsyncClient) -> httpx.Response:
        posts = [
            client.post("/predict", json={"model": model, "inputs": m.tolist()})
            for m in (
                wild_mates(inputs, rng, int(rng.integers(1, 6))) for _ in range(mates_per_round)
            )
        ]
        # The probe goes out in the middle of its mates, so it queues among them.
        posts.insert(
            mates_per_round // 2,
            client.post("/predict", json={"model": model, "inputs": probe.tolist()}),
        )
        answers = await asyncio.gather(*posts)
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return answers[mates_per_round // 2]

    async def all_rounds(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return [await among_mates(client) for _ in range(rounds)]

    # NOTE: a fixed wait for batch mates: the adaptive one runs a request that finds the model
    # idle at once, and on a fast run every request could find it so (then no batch is shared).
    settings = Settings(
        model_store=shipped_store, default_model=model, max_delay_ms=20.0, adaptive_delay=False
    )
    with serve(create_app(settings)) as base:
        alone = outputs(httpx.post(f"{base}/predict", json={"inputs": probe.tolist()}))
        batched = [outputs(r) for r in asyncio.run(all_rounds(base))]
        batches = metric_samples(base, "foldserve_batch_size")
    for inside in batched:
        # Float32 kernels may sum in another order inside a bigger batch (~1e-6 on logits
        # of ~10); a BN on batch statistics would move them by whole units.
        np.testing.assert_allclose(inside, alone, rtol=0, atol=1e-5)
    key = f"model={model},version=1"
    requests = 1 + rounds * (mates_per_round + 1)
    assert batches[f"foldserve_batch_size_count{{{key}}}"] < requests  # batches held > 1 request
    assert (
        batches[f"foldserve_batch_size_bucket{{le=1.0,{key}}}"]
        < batches[f"foldserve_batch_size_count{{{key}}}"]
    )
