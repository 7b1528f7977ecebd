"""``foldserve export`` of modules of several inputs and outputs: forward(image, meta) returning
a dict, a tuple (deep supervision) or a dataclass; folded, written as ONNX and TorchScript with
named tensors, verified, and served equal to the eval-mode module by both backends."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import numpy as np
import onnx
import orjson
import pytest
import torch
from torch import nn

import foldserve
from foldserve import cli
from service.app import create_app
from service.errors import FoldingError
from service.settings import Settings
from service.store import read_manifest
from tests.service.conftest import serve

IMAGE, META = (3, 6, 6), (5,)


def _made(kind: type[nn.Module]) -> nn.Module:
    """The same weights and statistics at every call: a reference can be made again."""
    torch.manual_seed(0)
    model = kind()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_()
    return model.eval()


class TwoHeads(nn.Module):
    """An image and its metadata in; class scores over both and a mask of the image out."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.meta = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU())
        self.classify = nn.Linear(8, 3)
        self.mask = nn.Conv2d(4, 2, 1)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(image)
        pooled = features.mean(dim=(2, 3))
        scores = self.classify(torch.cat([pooled, self.meta(meta)], dim=1))
        return {"scores": scores, "mask": self.mask(features)}


class DeepSupervision(nn.Module):
    """One input, a tuple of outputs: the head's and an auxiliary one from halfway."""

    def __init__(self) -> None:
        super().__init__()
        self.early = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.late = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        early = self.early(image)
        return self.late(early), early.mean(dim=(2, 3))


class WithTrainingLoss(DeepSupervision):
    """Returns None where a training loss would be, as MONAI's SegResNetVAE does in eval mode."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:  # type: ignore[override]
        head, auxiliary = super().forward(image)
        return head, None, auxiliary


class Nested(DeepSupervision):
    """Lists of feature maps per scale, as MONAI's MultiScalePatchDiscriminator returns them."""

    def forward(self, image: torch.Tensor) -> list[list[torch.Tensor]]:  # type: ignore[override]
        head, auxiliary = super().forward(image)
        return [[head, auxiliary], [head.mean(dim=1)]]


@dataclasses.dataclass
class Answer:
    embedding: torch.Tensor
    score: torch.Tensor


class AsDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.score = nn.Linear(6, 1)

    def forward(self, meta: torch.Tensor) -> Answer:
        embedding = self.body(meta)
        return Answer(embedding, self.score(embedding))


def _inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, *IMAGE)).astype(np.float32),
        "meta": rng.normal(size=(n, *META)).astype(np.float32),
    }


def _served(store: Path, name: str, body: dict[str, object], backend: str) -> dict[str, object]:
    settings = Settings(
        model_store=store, default_model=name, backend=backend, allow_torchscript=True
    )
    with serve(create_app(settings)) as base:
        answer = httpx.post(f"{base}/predict", json=body)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_a_module_of_two_inputs_returning_a_dict_is_exported_and_served_by_both_backends(
    tmp_path: Path,
) -> None:
    model = _made(TwoHeads)
    store = tmp_path / "store"
    result = foldserve.export(
        model, {"image": IMAGE, "meta": META}, store=store, name="two-heads", labels=["a", "b", "c"]
    )
    manifest = result.build.manifest
    assert [(s.name, s.shape) for s in manifest.inputs] == [("image", IMAGE), ("meta", META)]
    assert [(s.name, s.shape) for s in manifest.outputs] == [("scores", (3,)), ("mask", (2, 6, 6))]
    assert [f.format for f in manifest.files] == ["onnx", "torchscript"]
    assert manifest.provenance.fold_path == "torch.fx" and len(manifest.batch_norm) == 2
    graph = onnx.load(result.path / "model.onnx").graph
    assert [i.name for i in graph.input] == ["image", "meta"]
    assert [o.name for o in graph.output] == ["scores", "mask"]
    assert "BatchNormalization" not in {node.op_type for node in graph.node}

    x = _inputs(3, seed=1)
    with torch.no_grad():
        expected = model(torch.from_numpy(x["image"]), torch.from_numpy(x["meta"]))
    body = {"inputs": {k: v.tolist() for k, v in x.items()}}
    for backend in ("onnx", "torchscript"):
        got = _served(store, "two-heads", body, backend)
        outputs = got["outputs"]
        assert isinstance(outputs, dict)
        for name in ("scores", "mask"):
            np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-4, atol=1e-5)
        assert got["predictions"] == [["a", "b", "c"][i] for i in expected["scores"].argmax(1)]


def test_population_statistics_over_an_npz_of_both_inputs(tmp_path: Path) -> None:
    data = _inputs(64, seed=2)
    data["meta"] = data["meta"] * 3.0 + 1.0
    calibration = tmp_path / "data.npz"
    np.savez(calibration, **data)
    store = tmp_path / "store"
    code = cli.main(
        [
            *("export", "--model", f"{__file__}:TwoHeads", "--store", str(store)),
            *("--name", "two-heads", "--calibration", str(calibration)),
            *("--output-names", "classes,segments"),
            *("--input-shape", "image=3,6,6", "--input-shape", "meta=5"),
        ]
    )
    assert code == 0
    manifest = read_manifest(store / "two-heads" / "1")
    assert manifest.provenance.bn_stats == "population"
    assert [spec.name for spec in manifest.outputs] == ["classes", "segments"]
    assert "64 samples of inputs ['image', 'meta']" in (manifest.provenance.calibration or "")
    # Both paths' BatchNorms recomputed over the data, named as in the module itself.
    assert [record.name for record in manifest.batch_norm] == ["features.1", "meta.1"]
    assert all(record.stats_shift is not None for record in manifest.batch_norm)
    statistics = manifest.input_statistics
    assert statistics is not None and statistics.source == "calibration"
    np.testing.assert_allclose(statistics.mean, data["image"].mean(axis=(0, 2, 3)), rtol=1e-5)


def test_deep_supervision_tuples_and_dataclasses_name_their_outputs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    deep = foldserve.export(_made(DeepSupervision), IMAGE, store=store, name="deep")
    assert [s.name for s in deep.build.manifest.outputs] == ["output0", "output1"]
    assert deep.build.manifest.task == "segmentation"  # the first output, per pixel
    renamed = foldserve.export(
        _made(DeepSupervision), IMAGE, store=store, name="renamed", output_names=["mask", "aux"]
    )
    assert [s.name for s in renamed.build.manifest.outputs] == ["mask", "aux"]
    graph = onnx.load(renamed.path / "model.onnx").graph
    assert [o.name for o in graph.output] == ["mask", "aux"]
    with pytest.raises(FoldingError, match=r"1 output names for the model's 2 outputs"):
        foldserve.export(_made(DeepSupervision), IMAGE, store=store, name="x", output_names=["a"])
    nested = foldserve.export(_made(Nested), IMAGE, store=store, name="nested")
    assert [s.name for s in nested.build.manifest.outputs] == [
        "output0_0",
        "output0_1",
        "output1_0",
    ]
    loss = foldserve.export(_made(WithTrainingLoss), IMAGE, store=store, name="loss")
    assert [s.name for s in loss.build.manifest.outputs] == ["output0", "output2"]  # no None
    fields = foldserve.export(_made(AsDataclass), META, store=store, name="fields")
    assert [(s.name, s.shape) for s in fields.build.manifest.outputs] == [
        ("embedding", (6,)),
        ("score", (1,)),
    ]
    x = _inputs(2, seed=3)["image"]
    with torch.no_grad():
        expected = _made(DeepSupervision)(torch.from_numpy(x))
    got = _served(store, "deep", {"inputs": x.tolist()}, "onnx")["outputs"]
    assert isinstance(got, dict)
    np.testing.assert_allclose(got["output0"], expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["output1"], expected[1], rtol=1e-4, atol=1e-5)


def test_shapes_that_do_not_fit_forward_are_refused_with_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(FoldingError, match="give each input's shape, by name, in the order"):
        foldserve.export(TwoHeads().eval(), IMAGE, store=tmp_path, name="x")
    code = cli.main(
        [
            *("export", "--model", f"{__file__}:TwoHeads", "--store", str(tmp_path)),
            *("--name", "x", "--input-shape", "image=3,6,6", "--input-shape", "5"),
        ]
    )
    assert code == 1


def test_a_monai_network_with_deep_supervision_is_served_every_output_over_v2(
    tmp_path: Path,
) -> None:
    from monai.networks.nets import BasicUNetPlusPlus

    torch.manual_seed(0)
    model = BasicUNetPlusPlus(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        features=(4, 4, 8, 8, 8, 4),
        norm="batch",
        deep_supervision=True,
    )
    model.train()
    with torch.no_grad():  # statistics of its own, not the initial 0 and 1
        for _ in range(3):
            model(torch.randn(4, 1, 16, 16) * 2 + 0.5)
    model.eval()
    store = tmp_path / "store"
    result = foldserve.export(model, (1, 16, 16), store=store, name="unetpp")
    manifest = result.build.manifest
    assert [s.name for s in manifest.outputs] == ["output0", "output1", "output2", "output3"]
    assert len(manifest.batch_norm) > 0
    x = np.random.default_rng(4).normal(size=(2, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(x))]
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [2, 1, 16, 16],
                 "parameters": {"binary_data_size": x.nbytes}},
            ],
            "parameters": {"binary_data_output": True},
        }
    )  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header))}
    settings = Settings(model_store=store, default_model="unetpp")
    with serve(create_app(settings)) as base:
        answer = httpx.post(
            f"{base}/v2/models/unetpp/infer", content=header + x.tobytes(), headers=headers
        )
    assert answer.status_code == 200, answer.text
    length = int(answer.headers["inference-header-content-length"])
    tensors = orjson.loads(answer.content[:length])["outputs"]
    assert [t["name"] for t in tensors] == ["output0", "output1", "output2", "output3"]
    raw, offset = answer.content[length:], 0
    for tensor, want in zip(tensors, expected, strict=True):
        size = tensor["parameters"]["binary_data_size"]
        got = np.frombuffer(raw[offset : offset + size], dtype="<f4").reshape(tensor["shape"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        offset += size
