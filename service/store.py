"""The model store: its layout and manifest schema, the one contract of trainer and server.

Layout: ``<root>/<name>/<version>/`` with integer versions, the model files and ``manifest.json``.
A version is written into a hidden temporary folder and renamed into place, so a crash mid-write
never leaves a version that loads. The server also reads one model's folder or one version's
folder as a store of one model (``open_store``): what KServe puts at ``/mnt/models``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import StoreError

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION: Literal[1] = 1
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# ASCII digits, no leading zero: "01" next to "1", or "²" (str.isdigit says yes), is not a version.
_VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,8}$")
_FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a plain name inside the version
STALE_STAGING_S = 3600.0

ModelFormat = Literal["onnx", "torchscript"]
Placement = Literal["folded_into_previous", "folded_into_next", "frozen_affine"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TensorDtype = Literal["float32", "float16", "uint8", "int32", "int64"]


class TensorSpec(_Strict):
    """One input or output tensor; ``shape`` is per sample (the batch dimension is implied).
    Inputs take any of these dtypes (requests are checked and cast to it); outputs are float32.
    """

    name: str
    dtype: TensorDtype = "float32"
    shape: tuple[int, ...]


class ImageInput(_Strict):
    """How an encoded image (PNG or JPEG) becomes one of the model's inputs: the preprocessing
    the network was trained with, written down beside it so that clients send the image itself.

    decode -> convert to ``channels`` (BGR: RGB's channels reversed) -> resize to ``size``
    (``resize``) -> ``pixel * scale`` -> ``(x - mean) / std`` per channel (in ``channels``'
    order) -> ``layout``: channels first (CHW, PyTorch's) or last (HWC, Keras's).
    """

    input: str = Field(description="the input tensor the image becomes")
    channels: Literal["RGB", "BGR", "L"] = Field(
        description="RGB or BGR (3 channels, in that order) or L (grey, 1 channel)"
    )
    size: tuple[int, int] = Field(description="(height, width) the image is resized to")
    resize: Literal["bilinear"] = "bilinear"
    layout: Literal["CHW", "HWC"] = "CHW"
    scale: float = Field(1.0 / 255.0, gt=0.0, description="each 0..255 pixel value times this")
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _per_channel(self) -> ImageInput:
        count = self.channel_count()
        if len(self.mean) != count or len(self.std) != count or min(self.std) <= 0:
            raise ValueError(f"{self.channels} images need {count} means and {count} stds > 0")
        if min(self.size) < 1:
            raise ValueError(f"image size {self.size} must be positive")
        return self

    def channel_count(self) -> int:
        return 1 if self.channels == "L" else 3

    def shape(self) -> tuple[int, int, int]:
        """The tensor one image becomes."""
        height, width = self.size
        count = self.channel_count()
        return (count, height, width) if self.layout == "CHW" else (height, width, count)


class ModelFile(_Strict):
    format: ModelFormat
    path: str = Field(pattern=_FILE_PATTERN.pattern, description="a file name in the version")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int


class StatsShift(_Strict):
    """How far recomputed (population) statistics moved from the module's running estimates."""

    max_mean_shift: float = Field(
        description="max over channels of |mean_population - mean_running| / running std"
    )
    max_abs_log_var_ratio: float = Field(
        description="max over channels of |ln(var_population / var_running)|"
    )


class BatchNormRecord(_Strict):
    """Where one BatchNorm layer of the trained network went in the exported graph."""

    name: str
    features: int
    placement: Placement
    target: str | None = Field(description="the layer it was folded into, or None for an affine")
    stats_sha256: str = Field(description="sha256 of the frozen mean, var, eps, weight, bias")
    stats_shift: StatsShift | None = Field(
        None, description="population vs running statistics, when population ones were computed"
    )


class InputStatistics(_Strict):
    """The frozen statistics of the BatchNorm applied to the model's input, kept from before
    folding: what the training inputs looked like. The server compares live inputs with them
    (``service.drift``) and never uses them to change the model.
    """

    layer: str = Field(
        description="the monitored BatchNorm: the one reading the model's input; 'input' when "
        "the model has none and the statistics are the calibration data's own (source "
        "'calibration')"
    )
    axis: Literal["feature", "channel"] = Field(
        description="feature: one statistic per input of (n, F) samples; channel: per index of "
        "axis 1 of (n, C, *spatial) samples, spatial positions pooled"
    )
    source: Literal["ema", "population", "as_imported", "calibration"]
    mean: tuple[float, ...]
    var: tuple[float, ...]
    eps: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _sized(self) -> InputStatistics:
        if not self.mean or len(self.mean) != len(self.var):
            raise ValueError(f"{len(self.mean)} means for {len(self.var)} variances")
        if not all(math.isfinite(v) for v in (*self.mean, *self.var)) or min(self.var) < 0:
            raise ValueError("input statistics must be finite, with variances >= 0")
        return self

    def check_fits(self, shape: tuple[int, ...]) -> None:
        """Refuse statistics that cannot describe samples of ``shape``."""
        count = len(self.mean)
        fits = shape == (count,) if self.axis == "feature" else shape[:1] == (count,)
        if not fits or (self.axis == "channel" and len(shape) < 2):
            raise ValueError(f"input statistics per {self.axis} ({count}) do not fit {shape}")


class SideFile(_Strict):
    """A file of the version that is not a model (e.g. a drift monitor's map), hashed the same."""

    path: str = Field(pattern=_FILE_PATTERN.pattern, description="a file name in the version")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class HiddenStatistics(InputStatistics):
    """The frozen statistics of a hidden BatchNorm whose input is an affine map of the raw input
    (``[input BN] -> Linear | Conv2d -> this BN``), and that map, composed into one and kept in a
    side file: the server maps live inputs through it and compares with these statistics
    (``service.drift``). Only observed, never used to change the model.
    """

    layer: str = Field(description="the monitored hidden BatchNorm")
    map: Literal["linear", "conv2d"] = Field(
        description="linear: rows @ weight + bias; conv2d: a 2-D convolution (groups 1, no "
        "dilation) of the raw input padded with pad_value"
    )
    map_from: str = Field(description="the Linear or Conv2d the map was made from")
    through: str | None = Field(description="the input BatchNorm composed into the map, if any")
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    file: SideFile = Field(description="the map's arrays (.npz: weight, bias[, pad_value])")


class Verification(_Strict):
    """What the exporter proved before the version was written.

    A tolerance bounds each sample's output: ``|actual - expected| <= atol + rtol * max|expected|``
    over that sample, so one float32 rounding on outputs of size 10^3 is not mistaken for a change.
    """

    # Bounded so an artifact cannot switch the server's checks off with a huge tolerance.
    atol: float = Field(ge=0.0, le=1e-3)
    rtol: float = Field(ge=0.0, le=1e-3)
    batch_statistics_ops: int
    max_abs_diff: dict[ModelFormat, float]
    max_rel_diff: dict[ModelFormat, float] = Field(
        default_factory=dict, description="max_abs_diff over the largest |output| of its sample"
    )
    batch_invariance_max_diff: float
    samples_checked: int
    bitwise_batch_invariant: bool | None = Field(
        None,
        description="every probe's ONNX Runtime output alone equals it bit for bit inside "
        "batches of every size up to bitwise_max_rows (None: not measured)",
    )
    bitwise_max_rows: int | None = None


EntryPoint = Literal["train", "export", "import"]
FoldPath = Literal["torch.fx", "onnx"]


class Provenance(_Strict):
    """How a version was made. Fields that only a demo trained here can know are None otherwise."""

    entry_point: EntryPoint = Field("train", description="train a demo, export a module, import")
    fold_path: FoldPath = Field("torch.fx", description="where the BatchNorms were folded")
    source: str | None = Field(None, description="the module factory, checkpoint or ONNX file")
    dataset: str | None = None
    split: str | None = None
    seed: int | None = None
    epochs: int | None = None
    bn_stats: Literal["ema", "population", "as_imported"]
    calibration: str | None = Field(
        None, description="data the statistics and checks came from (None: generated inputs)"
    )
    calibration_samples: int | None = None
    dtype_conversion: str | None = Field(
        None, description="e.g. 'float64 -> float32', checked against the original"
    )
    train_config: dict[str, str | int | float] = Field(
        default_factory=dict, description="every training hyper-parameter, so a run can be redone"
    )
    accuracy_ema: float | None = None
    accuracy_population: float | None = None
    accuracy_unfolded_exported_stats: float | None = None
    torch_version: str | None = None
    onnx_opset: int
    command: str
    created_at: str


class Golden(_Strict):
    """A few samples and the outputs the exported model gives; the server re-checks them at load.

    Each row holds one sample's tensors flattened and put side by side in the manifest's order
    (``service.packing``): for a model of one input and one output, simply its values.
    """

    inputs: list[list[float]]
    outputs: list[list[float]]


class BatchingConfig(_Strict):
    max_batch_size: int = Field(64, ge=1, description="cap on rows per backend call")
    max_delay_ms: float = Field(
        2.0, ge=0.0, description="longest wait counted from the oldest request"
    )


class Manifest(_Strict):
    schema_version: Literal[1] = 1
    name: str
    version: int = Field(ge=1)
    architecture: str
    task: Literal["classification", "regression", "segmentation"]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: list[str] = Field(
        description="one per value of the first output, the one a classifier's predictions read"
    )
    files: tuple[ModelFile, ...]
    batch_norm: tuple[BatchNormRecord, ...]
    verification: Verification
    provenance: Provenance
    golden: Golden
    batching: BatchingConfig = BatchingConfig()
    input_statistics: InputStatistics | None = Field(
        None,
        description="the frozen statistics of the BatchNorm reading the (first) input (None: "
        "no input BatchNorm)",
    )
    hidden_statistics: tuple[HiddenStatistics, ...] = Field(
        (), description="hidden BatchNorms monitored through a map of the input (see its docs)"
    )
    image: ImageInput | None = Field(
        None, description="the preprocessing that makes an image one of the inputs (None: no)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        """Refuse a manifest whose parts disagree, before any model is loaded from it."""
        for side, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [spec.name for spec in specs]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"{side} must be at least one, each with its own name: {names}")
        if any(spec.dtype != "float32" for spec in self.outputs):
            raise ValueError("outputs are float32 (the server answers FP32)")
        in_size = sum(math.prod(spec.shape) for spec in self.inputs)
        out_size = sum(math.prod(spec.shape) for spec in self.outputs)
        labeled = math.prod(self.outputs[0].shape)
        if self.labels and len(self.labels) != labeled:
            raise ValueError(
                f"{len(self.labels)} labels for {labeled} values of output {self.outputs[0].name!r}"
            )
        golden = self.golden
        if not golden.inputs or len(golden.inputs) != len(golden.outputs):
            raise ValueError("golden inputs and outputs must be non-empty and of equal count")
        if any(len(row) != in_size for row in golden.inputs):
            raise ValueError(f"every golden input must hold {in_size} values")
        if any(len(row) != out_size for row in golden.outputs):
            raise ValueError(f"every golden output must hold {out_size} values")
        paths = [f.path for f in self.checked_files()]
        if len(set(paths)) != len(paths) or MANIFEST_FILE in paths:
            raise ValueError("two files share one path (or one is named manifest.json)")
        if self.image is not None:
            spec = self.inputs[0]
            if len(self.inputs) != 1 or spec.name != self.image.input:
                raise ValueError("images are the input of a model of one input")
            if spec.shape != self.image.shape() or spec.dtype not in ("float32", "float16"):
                raise ValueError(
                    f"images become float {self.image.shape()} for input {spec.name!r}, which "
                    f"is {spec.dtype} {spec.shape}"
                )
        if self.input_statistics is not None:
            self.input_statistics.check_fits(self.inputs[0].shape)
        for hidden in self.hidden_statistics:
            rank = {"linear": 1, "conv2d": 3}[hidden.map]
            axis = {"linear": "feature", "conv2d": "channel"}[hidden.map]
            if len(self.inputs[0].shape) != rank or hidden.axis != axis:
                raise ValueError(
                    f"hidden statistics of {hidden.layer} ({hidden.map}, per {hidden.axis}) do "
                    f"not fit inputs shaped {self.inputs[0].shape}"
                )
        return self

    def file(self, fmt: ModelFormat) -> ModelFile | None:
        return next((f for f in self.files if f.format == fmt), None)

    def checked_files(self) -> tuple[ModelFile | SideFile, ...]:
        """Every file of the version the manifest vouches for: models first, then side files."""
        return (*self.files, *(hidden.file for hidden in self.hidden_statistics))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_model_name(name: str) -> bool:
    return _NAME_PATTERN.fullmatch(name) is not None


def check_model_name(name: str) -> str:
    if not _NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' or '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )
    return name


def version_dir(root: Path, name: str, version: int) -> Path:
    return root / check_model_name(name) / str(version)


def list_models(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME_PATTERN.fullmatch(p.name))


def list_versions(root: Path, name: str) -> list[int]:
    """Complete versions only: integer folders holding a manifest (temporary folders are hidden)."""
    model_root = root / check_model_name(name)
    if not model_root.is_dir():
        return []
    return _version_folders(model_root)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise StoreError(f"{path}: no manifest") from exc
    except ValidationError as exc:
        raise StoreError(f"{path}: invalid manifest: {_problems(exc)}") from exc
    except ValueError as exc:
        raise StoreError(f"{path}: invalid manifest: {exc}") from exc


def _problems(exc: ValidationError, shown: int = 5) -> str:
    """pydantic's errors as ``field: message`` (its own text repeats every input and links
    to its documentation: fine in a terminal, not in /models)."""
    problems = [f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()]
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


StoreLayout = Literal["store", "model", "version"]


@dataclass(frozen=True)
class StoreView:
    """Where each version of a store lives, whichever of the three layouts the folder has.

    ``store``: ``<name>/<version>/`` folders. ``model``: one model's ``<version>/`` folders.
    ``version``: the files and ``manifest.json`` of one version. In the last two the model's
    name (and the version's number) come from the manifests, since the folder's own name is
    wherever it was mounted (KServe: ``/mnt/models``).
    """

    root: Path
    layout: StoreLayout = "store"
    name: str | None = None  # the one model's name (model and version layouts)
    version: int | None = None  # the one version's number (version layout)

    def models(self) -> list[str]:
        return list_models(self.root) if self.name is None else [self.name]

    def versions(self, name: str) -> list[int]:
        if self.layout == "store":
            return list_versions(self.root, name)
        if name != self.name:
            return []
        if self.version is not None:
            return [self.version]
        return _version_folders(self.root)

    def answering_for(self, name: str) -> str | None:
        """The model that answers to ``name``: that model, or the store's only model whatever
        it is called (KServe names a model after its InferenceService, the store after its
        manifest); None when neither."""
        models = self.models()
        if name in models:
            return name
        return models[0] if len(models) == 1 else None

    def version_dir(self, name: str, version: int) -> Path:
        if self.layout == "store":
            return version_dir(self.root, name, version)
        if name != self.name:
            raise StoreError(f"{self.root} holds only model {self.name!r}, not {name!r}")
        return self.root if self.layout == "version" else self.root / str(version)


def check_inside(root: Path, path: Path) -> None:
    """Refuse a path that resolves outside the store: a symlinked version folder or file could
    make the server load (and vouch for) whatever it points at.

    NOTE: links in the store's own folder are the operator's, and followed: KServe's storage
    initializer serves a local or PVC model by linking each entry of the model's folder into
    ``/mnt/models``. What they lead into is then the store's too; a link below them that
    leaves both is refused, as one in a plain store is.
    """
    real = path.resolve()
    for tree in trusted_trees(root):
        if real == tree or real.is_relative_to(tree):
            return
    shown = path.relative_to(root) if path.is_relative_to(root) else path.name
    raise StoreError(
        f"{shown} resolves outside the model store and the folders its own links lead to "
        "(a symlink below them?): refused"
    )


def trusted_trees(root: Path) -> list[Path]:
    """The store's real folder, and where each link directly in it leads."""
    trees = [root.resolve()]
    with contextlib.suppress(OSError):
        trees += [entry.resolve() for entry in root.iterdir() if entry.is_symlink()]
    return trees


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: Path) -> Fingerprint:
    """Names, sizes and modification times of a version's files: cheap to compare at every
    rescan; a difference sends the version back through the full checks (sha256 and all)."""
    entries = []
    with contextlib.suppress(OSError):
        for path in sorted(directory.iterdir()):
            stat = path.stat()
            entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def open_store(root: Path) -> StoreView:
    """Read the layout off the folder: a ``manifest.json`` in it makes it one version, numbered
    folders holding one make it one model, anything else is a whole store (maybe empty).

    A folder that looks like two of these at once is refused rather than half served.
    """
    if not root.is_dir():
        return StoreView(root)
    own_manifest = (root / MANIFEST_FILE).is_file()
    versions = _version_folders(root)
    # NOTE: a model may be named "1", so a numbered folder is a version only with a manifest in it.
    models = [name for name in list_models(root) if list_versions(root, name)]
    found = [
        what
        for what, present in (
            (f"a {MANIFEST_FILE} (one version)", own_manifest),
            (f"version folders {versions} (one model)", bool(versions)),
            (f"model folders {models} (a whole store)", bool(models)),
        )
        if present
    ]
    if len(found) > 1:
        raise StoreError(f"model store {root} holds {' and '.join(found)}: point it at one of them")
    if own_manifest:
        manifest = read_manifest(root)
        return StoreView(root, "version", check_model_name(manifest.name), manifest.version)
    if versions:
        return StoreView(root, "model", _model_name(root, versions))
    return StoreView(root)


def _version_folders(model_root: Path) -> list[int]:
    """Complete versions directly under ``model_root`` (see ``list_versions``)."""
    return sorted(
        int(p.name)
        for p in model_root.iterdir()
        if _VERSION_PATTERN.fullmatch(p.name) and (p / MANIFEST_FILE).is_file()
    )


def _model_name(model_root: Path, versions: list[int]) -> str:
    """The name the manifests give the model, the newest readable one first.

    A version whose manifest names another model is refused when it loads, as in a store.
    """
    errors = []
    for version in reversed(versions):
        try:
            return check_model_name(read_manifest(model_root / str(version)).name)
        except StoreError as exc:
            errors.append(exc.message)
    raise StoreError(f"no readable manifest names the model in {model_root}: {'; '.join(errors)}")


def write_version(
    root: Path,
    name: str,
    files: Mapping[str, bytes],
    make_manifest: Callable[[int, dict[str, str]], Manifest],
) -> Path:
    """Write ``files`` and the manifest as the next free version of ``name``, atomically.

    ``make_manifest(version, sha256_by_filename)`` builds the manifest once the version is known.
    The version folder appears in one ``rename``; if another writer took that number first, the
    next one is tried.
    """
    model_root = root / check_model_name(name)
    model_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(model_root)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_root))
    # mkdtemp makes a private 0700 folder; a server running as another user must read it.
    staging.chmod(0o755)
    try:
        digests: dict[str, str] = {}
        for filename, content in files.items():
            _write_durably(staging / filename, content)
            digests[filename] = hashlib.sha256(content).hexdigest()
        for _attempt in range(100):
            version = max(list_versions(root, name) + _numbered_dirs(model_root), default=0) + 1
            manifest = make_manifest(version, digests)
            if manifest.name != name or manifest.version != version:
                raise StoreError("make_manifest must use the name and version it is given")
            _write_durably(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
            _fsync_dir(staging)  # the folder's entries reach the disk before it becomes visible
            try:
                # NOTE: rename onto an existing non-empty folder fails, which is our lock.
                os.rename(staging, model_root / str(version))
            except OSError:
                continue
            _fsync_dir(model_root)
            return model_root / str(version)
        raise StoreError(f"could not find a free version for {name!r}")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _numbered_dirs(model_root: Path) -> list[int]:
    return [int(p.name) for p in model_root.iterdir() if _VERSION_PATTERN.fullmatch(p.name)]


def _remove_stale_staging(model_root: Path) -> None:
    """Staging folders of writers that died long ago; a live writer's folder is recent."""
    cutoff = time.time() - STALE_STAGING_S
    for path in model_root.glob(".staging-*"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path)


def _write_durably(path: Path, content: bytes) -> None:
    with path.open("wb") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
