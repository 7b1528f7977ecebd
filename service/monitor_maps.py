"""Maps from a model's raw input to a hidden BatchNorm's input, kept beside the model for drift.

A hidden BatchNorm right after the first Linear or Conv2d (behind the input BatchNorm, or on the
raw input) normalizes an affine map of the raw input. The exporter composes the input BN's eval
affine with that layer's weight and bias into one map and writes it to a side file of the
version (``monitor-<layer>.npz``, listed in the manifest with its sha256,
``service.store.HiddenStatistics``); the server maps the sampled rows through it (``apply``, in
the fold thread, chunked by ``values_per_row``) and compares with the hidden BN's frozen
statistics (``service.drift``). This module is the file's one definition, for both sides.

Arrays (float32):
- linear: ``weight`` (F, H) and ``bias`` (H,): ``rows @ weight + bias``.
- conv2d: ``weight`` (C_out, C_in, kh, kw), ``bias`` (C_out,), ``pad_value`` (C_in,): the raw
  value each channel is padded with (the one the input BN maps to 0; 0 without an input BN).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from service.backends import Array
from service.errors import VerificationError
from service.store import HiddenStatistics, Manifest

# NOTE: a bound on the side file (256 KiB of float32), not on the cost: what a map costs per row
# grows with its output positions (ResNet-50's 7x7 stem: 9,408 weights, 118 M multiply-adds an
# image), and the monitor bounds that by sampling rows within its CPU budget (service.drift).
MAX_WEIGHTS = 65_536
MAX_FILE_BYTES = 1 << 20
_ARRAYS = {"linear": ("weight", "bias"), "conv2d": ("weight", "bias", "pad_value")}


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz of float32 ``arrays``, byte for byte the same for the same arrays.

    NOTE: ``np.savez`` stamps each member with the current time; a fixed one keeps a re-export
    of the same weights identical.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w") as stream:
                contiguous = np.ascontiguousarray(array, dtype=np.float32)
                np.lib.format.write_array(stream, contiguous, allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class LinearMap:
    weight: Array  # (F, H)
    bias: Array  # (H,)
    positions = 1  # values of each feature per row

    @property
    def values_per_row(self) -> int:
        """Floats one row takes through the map (its input and its output): sizes chunks."""
        return int(self.weight.shape[0] + self.weight.shape[1])

    def columns(self, rows: Array) -> Array:
        """(n, F) -> (n, F): the rows the weight multiplies."""
        return rows.reshape(len(rows), -1)

    def apply(self, rows: Array) -> Array:
        """(n, F) -> (n, H): the hidden BN's input, one statistic per hidden feature."""
        out: Array = self.columns(rows) @ self.weight + self.bias
        return out


@dataclass(frozen=True)
class Conv2dMap:
    weight: Array  # (C_in * kh * kw, C_out), in the column order of columns()
    bias: Array  # (C_out,)
    pad_value: Array  # (C_in,)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    input_shape: tuple[int, int, int]  # (C_in, H, W)

    @property
    def positions(self) -> int:
        """Output positions per channel: each one more sample of it, as BatchNorm2d pools them."""
        (_, height, width), (ph, pw), (sh, sw) = self.input_shape, self.padding, self.stride
        return ((height + 2 * ph - self.kernel[0]) // sh + 1) * (
            (width + 2 * pw - self.kernel[1]) // sw + 1
        )

    @property
    def values_per_row(self) -> int:
        """Floats one row takes through the map (its columns and its output): sizes chunks."""
        return self.positions * int(self.weight.shape[0] + self.weight.shape[1])

    def columns(self, rows: Array) -> Array:
        """(n, C_in, H, W) -> (n * positions, C_in * kh * kw): im2col, rows in sample order."""
        n = len(rows)
        images = rows.reshape(n, *self.input_shape)
        (ph, pw), (sh, sw) = self.padding, self.stride
        if ph or pw:
            channels, height, width = self.input_shape
            padded = np.empty((n, channels, height + 2 * ph, width + 2 * pw), dtype=np.float32)
            padded[...] = self.pad_value[None, :, None, None]
            padded[:, :, ph : ph + height, pw : pw + width] = images
            images = padded
        windows = sliding_window_view(images, self.kernel, axis=(2, 3))[:, :, ::sh, ::sw]
        # (n, C, OH, OW, kh, kw) -> (n * OH * OW, C * kh * kw), the order of weight.reshape(Co, -1)
        columns: Array = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * self.positions, -1)
        return columns

    def apply(self, rows: Array) -> Array:
        """(n, C_in, H, W) -> (n, C_out, positions): the hidden BN's input."""
        out: Array = self.columns(rows) @ self.weight + self.bias
        return out.reshape(len(rows), self.positions, -1).transpose(0, 2, 1)


MonitorMap = LinearMap | Conv2dMap


def load_map(directory: Path, record: HiddenStatistics, manifest: Manifest) -> MonitorMap:
    """Read, check (sha256, arrays, shapes) and build the map of one monitored hidden layer."""
    side = record.file
    path = directory / side.path
    if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
        raise VerificationError(f"{side.path}: missing, or over {MAX_FILE_BYTES} bytes")
    content = path.read_bytes()
    # NOTE: hashed again here, on the bytes used: the file may change after check_files.
    if hashlib.sha256(content).hexdigest() != side.sha256:
        raise VerificationError(f"{side.path}: sha256 does not match the manifest's")
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as archive:
            arrays = {key: archive[key].astype(np.float32) for key in _ARRAYS[record.map]}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise VerificationError(f"{side.path}: not a {record.map} monitor map: {exc}") from exc
    try:
        return _build(record, arrays, manifest.inputs[0].shape)
    except ValueError as exc:
        raise VerificationError(f"{side.path}: {exc}") from exc


def _build(
    record: HiddenStatistics, arrays: dict[str, Array], input_shape: tuple[int, ...]
) -> MonitorMap:
    weight, bias, hidden = arrays["weight"], arrays["bias"], len(record.mean)
    if weight.size > MAX_WEIGHTS or not np.isfinite(weight).all() or not np.isfinite(bias).all():
        raise ValueError(f"weights must be finite and at most {MAX_WEIGHTS}")
    if bias.shape != (hidden,):
        raise ValueError(f"bias shaped {bias.shape} for {hidden} statistics")
    if record.map == "linear":
        if weight.shape != (*input_shape, hidden):
            raise ValueError(f"weight shaped {weight.shape} maps no {input_shape} to {hidden}")
        return LinearMap(weight, bias)
    channels, height, width = input_shape
    if weight.ndim != 4 or weight.shape[:2] != (hidden, channels):
        raise ValueError(f"weight shaped {weight.shape} for {channels} -> {hidden} channels")
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    (ph, pw) = record.padding
    if kernel[0] > height + 2 * ph or kernel[1] > width + 2 * pw or min(record.stride) < 1:
        raise ValueError(f"a {kernel} kernel does not fit {input_shape} padded by {(ph, pw)}")
    if arrays["pad_value"].shape != (channels,):
        raise ValueError(f"pad_value shaped {arrays['pad_value'].shape} for {channels} channels")
    return Conv2dMap(
        weight=np.ascontiguousarray(weight.reshape(hidden, -1).T),
        bias=bias,
        pad_value=arrays["pad_value"],
        kernel=kernel,
        stride=record.stride,
        padding=record.padding,
        input_shape=(channels, height, width),
    )
