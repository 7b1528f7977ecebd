"""Bring your own model, end to end: export a real architecture, then a real server answers with
it over /predict (nested JSON lists) and V2 (binary tensors), equal to the original model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import torch

import foldserve
from service.app import create_app
from service.settings import Settings
from tests.foldserve.test_architectures import ARCHITECTURES, with_statistics
from tests.service.conftest import serve

LENGTH = "Inference-Header-Content-Length"
CLASSIFIER = "monai-resnet18-2d"
CLASSIFIER_SHAPE = (3, 16, 16)
SEGMENTER_SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """A MONAI ResNet-18 classifier and a 2-D MONAI UNet (batch norm) segmenter in one store."""
    from monai.networks import nets

    store = tmp_path_factory.mktemp("byom") / "store"
    torch.manual_seed(0)
    classifier = with_statistics(ARCHITECTURES[CLASSIFIER][0](), CLASSIFIER_SHAPE)
    labels = ["a", "b", "c", "d", "e"]
    resnet = foldserve.export(
        classifier, CLASSIFIER_SHAPE, store=store, name="resnet18", labels=labels
    )
    segmenter = with_statistics(
        nets.UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=3,
            channels=(8, 16),
            strides=(2,),
            norm="batch",
        ),
        SEGMENTER_SHAPE,
    )
    unet = foldserve.export(segmenter, SEGMENTER_SHAPE, store=store, name="unet2d")
    return {"resnet18": (resnet.path, classifier), "unet2d": (unet.path, segmenter)}


@pytest.fixture(scope="module")
def base(exported: dict[str, tuple[Path, torch.nn.Module]]) -> Iterator[str]:
    store = exported["resnet18"][0].parent.parent
    with serve(create_app(Settings(model_store=store, default_model="resnet18"))) as url:
        yield url


def _eval_outputs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def _file_outputs(version: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_an_exported_classifier_answers_nested_json_like_the_original(
    base: str, exported: dict[str, tuple[Path, torch.nn.Module]]
) -> None:
    version, model = exported["resnet18"]
    x = np.random.default_rng(7).normal(size=(3, *CLASSIFIER_SHAPE)).astype(np.float32)
    response = httpx.post(f"{base}/predict", json={"inputs": x.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    outputs = np.asarray(body["outputs"], dtype=np.float32)
    np.testing.assert_allclose(outputs, _file_outputs(version, x), rtol=1e-5, atol=1e-6)
    expected = _eval_outputs(model, x)
    assert np.abs(outputs - expected).max() <= 1e-4 * np.abs(expected).max()
    assert body["predictions"] == [["a", "b", "c", "d", "e"][i] for i in expected.argmax(1)]


def test_an_exported_segmenter_answers_v2_binary_like_the_original(
    base: str, exported: dict[str, tuple[Path, torch.nn.Module]]
) -> None:
    version, model = exported["unet2d"]
    x = np.random.default_rng(8).normal(size=(4, *SEGMENTER_SHAPE)).astype(np.float32)
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    head = orjson.dumps(header)
    response = httpx.post(
        f"{base}/v2/models/unet2d/infer",
        content=head + x.astype("<f4").tobytes(),
        headers={LENGTH: str(len(head)), "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    length = int(response.headers[LENGTH])
    (output,) = orjson.loads(response.content[:length])["outputs"]
    assert output["shape"] == [4, 3, 16, 16]
    outputs = np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(outputs, _file_outputs(version, x), rtol=1e-5, atol=1e-6)
    expected = _eval_outputs(model, x)
    assert np.abs(outputs - expected).max() <= 1e-4 * np.abs(expected).max()
    metadata = httpx.get(f"{base}/v2/models/unet2d").json()
    assert metadata["inputs"][0]["shape"] == [-1, *SEGMENTER_SHAPE]
