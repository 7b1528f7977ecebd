"""The inputs an export is calibrated and checked on: the user's data, or generated samples.

Data is read lazily: a ``.npy`` file is memory-mapped and a folder of images is decoded a slice at
a time, so statistics over a large set need memory for one step only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from foldserve.tensors import Features, Samples
from service.errors import FoldingError
from service.packing import packing
from service.store import ImageInput, TensorSpec

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# NOTE: enough samples to probe every output and batch size; bounded in bytes so generated
# 3x224x224 inputs stay at 16 samples (~10 MB) while a tabular model gets 256.
CHECK_SAMPLES = 256
CHECK_BYTES = 16 << 20


@dataclass(frozen=True)
class Calibration:
    samples: Samples  # every calibration sample, read lazily
    description: str  # for the manifest: where the samples came from
    generated: bool  # True: no user data, inputs drawn at random
    dtype: str = "float32"  # of the rows the model is fed (service.packing: its rows' dtype)

    def check_inputs(self) -> Features:
        """A bounded in-memory subset to verify on: the first samples (they include the golden)."""
        per_sample = np.dtype(self.dtype).itemsize * max(1, math.prod(self.samples[:1].shape[1:]))
        count = max(2, min(CHECK_SAMPLES, CHECK_BYTES // per_sample, len(self.samples)))
        return np.array(self.samples[:count], dtype=self.dtype)  # writable, in memory


CalibrationSource = (
    str | Path | np.ndarray | Calibration | Callable[[tuple[TensorSpec, ...]], Calibration] | None
)


def resolve(given: CalibrationSource, shape: tuple[int, ...], seed: int = 0) -> Calibration:
    """What an entry point was given as calibration, as a ``Calibration`` (None: generated).

    A callable is called with the input (one, of ``shape``): the ONNX import learns it from the
    file.
    """
    if given is None:
        return generated(shape, seed)
    if isinstance(given, Calibration):
        return given
    if callable(given):
        return given((TensorSpec(name="input", shape=shape),))
    if isinstance(given, np.ndarray):
        if tuple(given.shape[1:]) != shape or len(given) < 2:
            raise FoldingError(
                f"calibration array is shaped {given.shape}; expected (N >= 2, *{shape})"
            )
        return Calibration(given, f"an array of {len(given)} samples", generated=False)
    return load(Path(given), shape)


def generated(sample_shape: tuple[int, ...], seed: int = 0) -> Calibration:
    """Standard normal samples: no statistics come from them, only checks and golden outputs."""
    per_sample = 4 * max(1, math.prod(sample_shape))
    count = max(2, min(CHECK_SAMPLES, CHECK_BYTES // per_sample))
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal((count, *sample_shape), dtype=np.float32)
    return Calibration(
        samples=samples,
        description=f"generated: {count} samples of N(0, 1), seed {seed}",
        generated=True,
    )


def generated_inputs(inputs: tuple[TensorSpec, ...], seed: int = 0) -> Calibration:
    """Generated samples of every input, as rows (``service.packing``): float inputs N(0, 1),
    uint8 ones uniform over 0..255 (pixels), other integers 0..7 (small ids: a model whose ids
    must be otherwise, an embedding of fewer rows, needs --calibration)."""
    rows = packing(inputs)
    if rows.dtype == np.float32 and all(spec.dtype == "float32" for spec in inputs):
        return generated(rows.row_shape, seed)
    count = max(2, min(CHECK_SAMPLES, CHECK_BYTES // max(1, rows.nbytes)))
    rng = np.random.default_rng(seed)
    tensors = []
    for spec in inputs:
        shape = (count, *spec.shape)
        if spec.dtype in ("float32", "float16"):
            tensors.append(rng.standard_normal(shape).astype(spec.dtype))
        else:
            high = 256 if spec.dtype == "uint8" else 8
            tensors.append(rng.integers(0, high, size=shape).astype(spec.dtype))
    kinds = ", ".join(f"{spec.name} {spec.dtype}" for spec in inputs)
    return Calibration(
        samples=rows.pack(tensors),
        description=f"generated: {count} samples ({kinds}; floats N(0, 1), uint8 0..255, "
        f"integers 0..7), seed {seed}",
        generated=True,
        dtype=str(rows.dtype),
    )


def load(
    path: Path,
    sample_shape: tuple[int, ...],
    *,
    key: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    limit: int | None = None,
    channels: str | None = None,
    layout: str = "CHW",
) -> Calibration:
    """Calibration samples from a ``.npy``/``.npz`` array or a folder of images.

    Arrays must be (N, *sample_shape). Images are decoded to ``sample_shape`` (C, H, W), C being
    1 (grey) or 3 (RGB): resized to H x W (bilinear), scaled to [0, 1], then ``(x - mean) / std``
    per channel when given.
    """
    if path.is_dir():
        samples: Samples = ImageFolder(
            path, sample_shape, mean=mean, std=std, channels=channels, layout=layout
        )
    elif path.suffix == ".npy":
        samples = _checked(np.load(path, mmap_mode="r"), path, sample_shape)
    elif path.suffix == ".npz":
        samples = _checked(_npz_array(path, key), path, sample_shape)
    else:
        raise FoldingError(
            f"calibration data {path}: expected a .npy or .npz array or a folder of images"
        )
    if limit is not None:
        samples = _Head(samples, limit)
    if len(samples) < 2:
        raise FoldingError(f"calibration data {path} holds {len(samples)} samples; need 2 or more")
    return Calibration(
        samples=samples, description=f"{path} ({len(samples)} samples)", generated=False
    )


def load_inputs(
    path: Path, inputs: tuple[TensorSpec, ...], *, limit: int | None = None
) -> Calibration:
    """Calibration samples of a model of several inputs: an ``.npz`` file with one array per
    input, named as the input, as many samples in each; in memory, each sample's inputs side by
    side in one row (``service.packing``)."""
    if path.suffix != ".npz":
        raise FoldingError(
            f"calibration data {path}: a model of several inputs takes an .npz file with one "
            f"array per input, named {[spec.name for spec in inputs]}"
        )
    with np.load(path) as archive:
        names = list(archive.keys())
        missing = [spec.name for spec in inputs if spec.name not in names]
        if missing:
            raise FoldingError(f"{path} has no array for inputs {missing}; it holds {names}")
        arrays = [_checked(np.asarray(archive[spec.name]), path, spec.shape) for spec in inputs]
    arrays = [array.astype(spec.dtype) for array, spec in zip(arrays, inputs, strict=True)]
    arrays = [array[:limit] for array in arrays] if limit is not None else arrays
    counts = {spec.name: len(array) for spec, array in zip(inputs, arrays, strict=True)}
    if len(set(counts.values())) != 1:
        raise FoldingError(f"{path}: the inputs hold different numbers of samples {counts}")
    rows = packing(inputs)
    samples = rows.pack(arrays)
    if len(samples) < 2:
        raise FoldingError(f"calibration data {path} holds {len(samples)} samples; need 2 or more")
    return Calibration(
        samples=samples,
        description=f"{path} ({len(samples)} samples of inputs {list(counts)})",
        generated=False,
        dtype=str(rows.dtype),
    )


def _npz_array(path: Path, key: str | None) -> np.ndarray:
    with np.load(path) as archive:
        names = list(archive.keys())
        if key is None and len(names) != 1:
            raise FoldingError(f"{path} holds arrays {names}: say which one with --calibration-key")
        name = key if key is not None else names[0]
        if name not in names:
            raise FoldingError(f"{path} has no array {name!r}; it holds {names}")
        return np.asarray(archive[name])


def _checked(array: np.ndarray, path: Path, sample_shape: tuple[int, ...]) -> np.ndarray:
    if tuple(array.shape[1:]) != sample_shape:
        raise FoldingError(
            f"calibration array in {path} is shaped {tuple(array.shape)}; expected "
            f"(N, {', '.join(map(str, sample_shape))}) for --input-shape "
            f"{','.join(map(str, sample_shape))}"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise FoldingError(f"calibration array in {path} has dtype {array.dtype}; need numbers")
    return array


class _Head:
    """The first ``limit`` samples of another source."""

    def __init__(self, samples: Samples, limit: int) -> None:
        self._samples = samples
        self._length = min(len(samples), max(0, limit))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: slice | int) -> Features:
        indices = range(self._length)[index]
        if isinstance(indices, int):
            return np.asarray(self._samples[indices], dtype=np.float32)
        if indices.step != 1:
            raise IndexError("only contiguous slices are read")
        return np.asarray(self._samples[indices.start : indices.stop], dtype=np.float32)


class ImageFolder:
    """Images under a folder (sorted by path), decoded on demand to float32 as
    ``image_preprocessing`` says (C, H, W; or H, W, C)."""

    def __init__(
        self,
        root: Path,
        sample_shape: tuple[int, ...],
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: str | None = None,
        layout: str = "CHW",
    ) -> None:
        self.spec = image_preprocessing("input", sample_shape, mean, std, channels, layout)
        self.paths = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.paths:
            raise FoldingError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        self.shape = sample_shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: slice | int) -> Features:
        if isinstance(index, int):
            return self._decode(self.paths[index])
        return (
            np.stack([self._decode(p) for p in self.paths[index]])
            if self.paths[index]
            else (np.zeros((0, *self.shape), dtype=np.float32))
        )

    def _decode(self, path: Path) -> Features:
        from PIL import Image

        from service.images import to_tensor

        with Image.open(path) as image:
            return to_tensor(image, self.spec)  # exactly as the server does to image requests


def image_preprocessing(
    input_name: str,
    sample_shape: tuple[int, ...],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: str | None = None,
    layout: str = "CHW",
) -> ImageInput:
    """How an image becomes the input ``input_name`` of ``sample_shape`` (C,H,W; or H,W,C with
    layout HWC; C 1 or 3): converted (``channels``: RGB or BGR for 3, L for 1), resized
    (bilinear), scaled to [0, 1], then ``(x - mean) / std`` per channel (one value for every
    channel, or one each; default 0 and 1)."""
    if layout not in ("CHW", "HWC"):
        raise FoldingError(f"image layout {layout!r}: CHW (channels first) or HWC (last)")
    if len(sample_shape) == 3:
        count = sample_shape[0] if layout == "CHW" else sample_shape[2]
        height, width = sample_shape[1:] if layout == "CHW" else sample_shape[:2]
    if len(sample_shape) != 3 or count not in (1, 3):
        where = "C,H,W" if layout == "CHW" else "H,W,C"
        raise FoldingError(
            f"images need an input shaped {where} with C 1 or 3, got {sample_shape} (a model "
            "taking channels last: --image-layout HWC)"
        )
    order = channels or ("RGB" if count == 3 else "L")
    if (order == "L") != (count == 1) or order not in ("RGB", "BGR", "L"):
        raise FoldingError(f"image channels {order!r} for an input of {count} channels")
    try:
        return ImageInput(
            input=input_name,
            channels=order,
            size=(height, width),
            layout=layout,
            mean=_per_channel(mean, count, "mean", 0.0),
            std=_per_channel(std, count, "std", 1.0),
        )
    except ValueError as exc:
        raise FoldingError(f"image preprocessing: {exc}") from None


def image_input_for(
    inputs: tuple[TensorSpec, ...],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: str | None,
    layout: str,
) -> ImageInput:
    """The image preprocessing of a model's input: it must be the model's one input, of
    floats (an image becomes normalized values)."""
    if len(inputs) != 1:
        names = [spec.name for spec in inputs]
        raise FoldingError(f"images are the input of a model of one input; this one takes {names}")
    (spec,) = inputs
    if spec.dtype not in ("float32", "float16"):
        raise FoldingError(
            f"input {spec.name!r} is {spec.dtype}: an image becomes normalized float values, so "
            "its model takes float32 or float16"
        )
    return image_preprocessing(spec.name, spec.shape, mean, std, channels, layout)


def _per_channel(
    values: Sequence[float] | None, channels: int, label: str, default: float
) -> tuple[float, ...]:
    if values is None:
        return (default,) * channels
    if len(values) not in (1, channels):
        raise FoldingError(f"image {label} needs 1 or {channels} values, got {len(values)}")
    if label == "std" and min(values) <= 0:
        raise FoldingError("image std must be positive")
    return tuple(float(v) for v in values) * (channels // len(values))
