"""Images in, answers out: a model exported with its image preprocessing (--image-mean and
--image-std) takes PNG and JPEG files on /predict, as the body or as base64 in JSON, and answers
what the tensor path answers for the same pixels after that preprocessing; a file claiming more
pixels than allowed is refused from its header (413) and the server goes on."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
from PIL import Image
from torch import nn

import foldserve
from service.app import create_app
from service.settings import Settings
from tests.service.browser import find_chromium, launched
from tests.service.conftest import running

SHAPE = (3, 8, 8)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
LABELS = ["cat", "dog", "fox"]


def picture(seed: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def preprocessed(data: bytes) -> np.ndarray:
    """The recorded preprocessing, written out here independently of the server's code."""
    with Image.open(io.BytesIO(data)) as image:
        resized = image.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float64) / 255.0
    chw = pixels.transpose(2, 0, 1)
    mean, std = np.asarray(MEAN).reshape(3, 1, 1), np.asarray(STD).reshape(3, 1, 1)
    return ((chw - mean) / std).astype(np.float32)


def _bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


@pytest.fixture(scope="module")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    folder = root / "calibration"
    folder.mkdir()
    for i in range(6):
        picture(i).save(folder / f"{i}.png")
    torch.manual_seed(0)
    store = root / "store"
    result = foldserve.export(
        Net().eval(),
        SHAPE,
        store=store,
        name="pets",
        labels=LABELS,
        calibration=foldserve.calibration.load(folder, SHAPE, mean=MEAN, std=STD),
        image_mean=MEAN,
        image_std=STD,
    )
    image = result.build.manifest.image
    assert image is not None and image.input == "input" and image.size == (8, 8)
    assert image.channels == "RGB" and image.mean == MEAN and image.std == STD
    foldserve.export(Net().eval(), SHAPE, store=store, name="tensors-only")
    return store


@pytest.fixture(scope="module")
def base(image_store: Path) -> Iterator[str]:
    settings = Settings(
        model_store=image_store, default_model="pets", max_image_pixels=40_000, max_queue_rows=16
    )
    with running(create_app(settings)) as (url, _):
        yield url


def _tensor_answer(base: str, rows: np.ndarray) -> dict[str, object]:
    answer = httpx.post(f"{base}/predict", json={"inputs": rows.tolist()})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_file_gets_the_answer_of_its_preprocessed_pixels(base: str, fmt: str) -> None:
    data = encoded(picture(50), fmt)
    content_type = f"image/{fmt.lower()}"
    answer = httpx.post(f"{base}/predict", content=data, headers={"Content-Type": content_type})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    expected = _tensor_answer(base, preprocessed(data)[np.newaxis])
    np.testing.assert_allclose(got["outputs"], expected["outputs"], rtol=1e-5, atol=1e-5)
    assert got["predictions"] == expected["predictions"] and got["predictions"][0] in LABELS


def test_base64_images_in_json_are_answered_in_order(base: str) -> None:
    files = [encoded(picture(60), "PNG"), encoded(picture(61, (30, 20)), "JPEG")]
    body = {"images": [base64.b64encode(f).decode() for f in files]}
    answer = httpx.post(f"{base}/predict", json=body)
    assert answer.status_code == 200, answer.text
    expected = _tensor_answer(base, np.stack([preprocessed(f) for f in files]))
    np.testing.assert_allclose(answer.json()["outputs"], expected["outputs"], atol=1e-5)


def test_a_decompression_bomb_is_refused_from_its_header_and_the_server_goes_on(
    base: str,
) -> None:
    for width, height in ((100_000, 100_000), (5_000, 5_000)):  # over Pillow's guard; under it
        bomb = _bomb(width, height)  # 10^10 or 2.5 10^7 pixels claimed in under 100 bytes
        assert len(bomb) < 100
        answer = httpx.post(f"{base}/predict", content=bomb, headers={"Content-Type": "image/png"})
        assert answer.status_code == 413
        assert "pixels, over max_image_pixels" in answer.json()["error"]
    over = encoded(picture(70, (300, 200)), "PNG")  # 60,000 > 40,000 allowed here
    answer = httpx.post(f"{base}/predict", content=over, headers={"Content-Type": "image/png"})
    assert answer.status_code == 413
    fine = encoded(picture(71), "PNG")
    answer = httpx.post(f"{base}/predict", content=fine, headers={"Content-Type": "image/png"})
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"),
    [
        (b"not an image", {"Content-Type": "image/png"}, 400, "image 0 is not a PNG or JPEG"),
        (b"GIF89a", {"Content-Type": "image/gif"}, 415, "'image/png' or 'image/jpeg'"),
        (b'{"images": ["%%%"]}', {"Content-Type": "application/json"}, 400, "not valid base64"),
        (b'{"images": []}', {"Content-Type": "application/json"}, 400, "list of base64 strings"),
    ],
)
def test_what_is_not_a_usable_image_gets_a_clear_error(
    base: str, content: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    answer = httpx.post(f"{base}/predict", content=content, headers=headers)
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_a_model_exported_without_image_preprocessing_takes_no_images(base: str) -> None:
    data = encoded(picture(80), "PNG")
    answer = httpx.post(
        f"{base}/models/tensors-only/predict", content=data, headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 415
    assert "takes no images" in answer.json()["error"]


def _v2_bytes_body(files: list[bytes]) -> tuple[bytes, dict[str, str]]:
    raw = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "BYTES", "shape": [len(files)],
                 "parameters": {"binary_data_size": len(raw)}},
            ]
        }
    )  # fmt: skip
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + raw, headers


def test_v2_takes_a_bytes_tensor_of_images_binary_or_base64(base: str) -> None:
    files = [encoded(picture(90), "JPEG"), encoded(picture(91), "PNG")]
    expected = _tensor_answer(base, np.stack([preprocessed(f) for f in files]))["outputs"]
    content, headers = _v2_bytes_body(files)
    answer = httpx.post(f"{base}/v2/models/pets/infer", content=content, headers=headers)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), expected, atol=1e-5)
    as_json = {
        "inputs": [
            {
                "name": "input",
                "datatype": "BYTES",
                "shape": [2, 1],
                "data": [base64.b64encode(f).decode() for f in files],
            }
        ]
    }
    answer = httpx.post(f"{base}/v2/models/pets/infer", json=as_json)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("files", "shape", "cut", "message"),
    [
        (2, [3], 0, "shape says 3 images, it holds 2"),
        (1, [1, 3], 0, "shaped [n] or [n, 1]"),
        (1, [1], 5, "is cut short"),
    ],
)
def test_v2_bytes_that_do_not_hold_what_they_say_are_refused(
    base: str, files: int, shape: list[int], cut: int, message: str
) -> None:
    content, headers = _v2_bytes_body([encoded(picture(i), "PNG") for i in range(files)])
    header_length = int(headers["Inference-Header-Content-Length"])
    header = orjson.loads(content[:header_length])
    header["inputs"][0]["shape"] = shape
    raw = content[header_length : len(content) - cut]
    header["inputs"][0]["parameters"]["binary_data_size"] = len(raw)
    text = orjson.dumps(header)
    headers["Inference-Header-Content-Length"] = str(len(text))
    answer = httpx.post(f"{base}/v2/models/pets/infer", content=text + raw, headers=headers)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


@pytest.mark.skipif(
    find_chromium() is None, reason="no chromium on PATH (apt-get install chromium)"
)
def test_the_status_page_takes_a_dropped_image_and_shows_its_label(base: str) -> None:
    data = encoded(picture(95), "PNG")
    expected = httpx.post(f"{base}/predict", content=data, headers={"Content-Type": "image/png"})
    label = expected.json()["predictions"][0]
    chromium = find_chromium()
    assert chromium is not None
    with launched(chromium) as browser:
        page = browser.new_page(1280, 1000)
        page.goto(f"{base}/?every_ms=300")
        try:
            page.wait_for("!document.getElementById('image-section').hidden")
        except Exception as exc:  # the page's own errors say why
            raise AssertionError(f"{exc}; the page's errors: {page.errors()}") from None
        assert page.evaluate("document.getElementById('draw-section').hidden")  # no digits model
        page.evaluate(
            "(() => {"
            f"const bytes = Uint8Array.from(atob('{base64.b64encode(data).decode()}'), "
            "c => c.charCodeAt(0));"
            "const transfer = new DataTransfer();"
            "transfer.items.add(new File([bytes], 'picture.png', {type: 'image/png'}));"
            "document.getElementById('image-drop').dispatchEvent("
            "new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));"
            "})()"
        )
        page.wait_for("document.querySelector('#image-predictions .prediction') !== null")
        shown = page.evaluate(
            "[...document.querySelectorAll('#image-predictions .prediction')]"
            ".map(p => [p.dataset.model, p.dataset.label])"
        )
    assert shown == [["pets", label]]


def test_channels_last_bgr_models_get_images_in_their_layout_and_order(tmp_path: Path) -> None:
    """A Keras-style graph (N, H, W, C) trained on BGR: the answer is each channel's mean, so
    the order and layout the server made are read off it directly."""
    from onnx import TensorProto, helper, numpy_helper

    from foldserve import cli

    axes = numpy_helper.from_array(np.asarray([1, 2], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image", "axes"], ["means"], keepdims=0)],
        "channel-means",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 6, 5, 3])],
        [helper.make_tensor_value_info("means", TensorProto.FLOAT, ["n", 3])],
        [axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    (tmp_path / "keras.onnx").write_bytes(model.SerializeToString())
    store = tmp_path / "store"
    code = cli.main(
        [
            *("import", str(tmp_path / "keras.onnx"), "--store", str(store), "--name", "keras"),
            *("--image-layout", "HWC", "--image-channels", "BGR", "--task", "regression"),
            *("--image-mean", "0.5", "--image-std", "0.25"),
        ]
    )
    assert code == 0
    solid = Image.new("RGB", (40, 30), (200, 100, 50))
    with running(create_app(Settings(model_store=store, default_model="keras"))) as (url, _):
        answer = httpx.post(
            f"{url}/predict", content=encoded(solid, "PNG"), headers={"Content-Type": "image/png"}
        )
    assert answer.status_code == 200, answer.text
    expected = (np.asarray([50, 100, 200]) / 255 - 0.5) / 0.25  # B, G, R
    np.testing.assert_allclose(answer.json()["outputs"][0], expected, rtol=1e-5)


def test_more_images_than_the_queue_holds_are_refused_before_one_is_decoded(base: str) -> None:
    one = encoded(Image.new("RGB", (1, 1)), "PNG")  # 67 bytes: each becomes 768 bytes here
    body = {"images": [base64.b64encode(one).decode()] * 17}  # the queue holds 16 rows
    answer = httpx.post(f"{base}/predict", json=body)
    assert answer.status_code == 413
    assert "request holds 17 images but at most 16 rows can queue" in answer.json()["error"]
    content, headers = _v2_bytes_body([one] * 17)
    answer = httpx.post(f"{base}/v2/models/pets/infer", content=content, headers=headers)
    assert answer.status_code == 413


def test_sixteen_bit_images_are_refused_not_clipped(base: str) -> None:
    deep = Image.fromarray(np.full((10, 12), 40_000, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    answer = httpx.post(
        f"{base}/predict", content=encoded(deep, "PNG"), headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 400
    assert "16-bit or float" in answer.json()["error"]
