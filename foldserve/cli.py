"""``foldserve train | export | import``: three ways into the model store, one pipeline behind them.

    foldserve train digits-mlp --store model_store
    foldserve export --model mypkg.nets:build --checkpoint net.pt --input-shape 3,64,64 \\
        --store model_store --name my-net [--bn-stats population --calibration train.npy]
    foldserve import model.onnx --store model_store --name their-net
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from service.errors import FoldingError, FoldserveError
from service.store import BatchNormRecord, ImageInput, Manifest, TensorSpec

TASKS = ("classification", "regression", "segmentation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldserve", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands.add_parser("train", help="train a demo network and store it"))
    _add_export(commands.add_parser("export", help="fold and store your own nn.Module"))
    _add_import(commands.add_parser("import", help="fold and store an ONNX file"))
    return parser


def _add_train(parser: argparse.ArgumentParser) -> None:
    try:
        from foldserve.demos.models import ARCHITECTURES
    except ImportError:  # `foldserve import` works without torch; train says so when run
        ARCHITECTURES = {}

    parser.description = (
        "Train a BatchNorm network, freeze its statistics, fold every BN away, "
        "export ONNX + TorchScript, verify them, and store a new model version."
    )
    parser.add_argument("arch", choices=sorted(ARCHITECTURES) or None, help="architecture to train")
    parser.add_argument("--store", type=Path, required=True, help="model store root folder")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs (default: the architecture's own)"
    )
    parser.add_argument(
        "--bn-stats",
        choices=("ema", "population"),
        default="population",
        help="statistics to freeze: population (exact, recomputed; default) or ema (running)",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, required=True, help="model store root folder")
    parser.add_argument("--name", required=True, help="model name in the store")
    parser.add_argument(
        "--labels",
        type=_labels,
        help="class labels: a file with one per line or a JSON list, or the JSON list itself "
        '(e.g. \'["cat", "dog"]\')',
    )
    parser.add_argument("--task", choices=TASKS, help="default: from the labels and output shape")
    parser.add_argument(
        "--calibration",
        type=Path,
        help="data to check on (and compute statistics from): .npy, .npz or a folder of images",
    )
    parser.add_argument("--calibration-key", help="the array to use in an .npz file")
    parser.add_argument("--calibration-limit", type=int, help="use the first N samples only")
    parser.add_argument(
        "--image-mean",
        type=_floats,
        help="the (first) input is an image: per-channel mean of its pixels scaled to [0, 1] "
        "(one value, or one per channel); recorded, so the server takes PNG and JPEG requests, "
        "and applied to image folders given as --calibration",
    )
    parser.add_argument(
        "--image-std", type=_floats, help="the image's per-channel std (with --image-mean)"
    )
    parser.add_argument(
        "--image-channels",
        choices=("RGB", "BGR", "L"),
        help="the image's channel order (default: RGB for 3 channels, L for 1)",
    )
    parser.add_argument(
        "--image-layout",
        choices=("CHW", "HWC"),
        help="channels first (CHW, default: PyTorch's) or last (HWC: Keras's NHWC inputs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of generated inputs and probes")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        help="rows per backend call in serving, proven bit for bit at every batch size up to it "
        "(default: 64, fewer for inputs over 256 KiB)",
    )


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Freeze the statistics of your BatchNorm network, fold every BN, export ONNX + "
        "TorchScript, verify them against the eval-mode module, and store a new version."
    )
    parser.add_argument("--model", required=True, help="MODULE:FACTORY or path/file.py:FACTORY")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON for FACTORY")
    parser.add_argument("--checkpoint", type=Path, help="a state_dict (or a whole saved module)")
    parser.add_argument(
        "--input-shape",
        type=_named_ints,
        action="append",
        required=True,
        help="one sample's shape, e.g. 3,224,224; for a forward of several tensors, each one's "
        "by name, in forward's order: --input-shape image=3,224,224 --input-shape meta=5",
    )
    parser.add_argument(
        "--output-names",
        type=_names,
        help="the outputs' names, in order, comma-separated (default: a dict's keys, a "
        "dataclass's fields, output0, output1, ... for a tuple; logits for one tensor)",
    )
    parser.add_argument(
        "--bn-stats",
        choices=("ema", "population"),
        help="ema: the running estimates (default without data); population: recomputed over "
        "--calibration (default with data)",
    )
    _add_common(parser)


def _add_import(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Fold every BatchNormalization of an ONNX file, verify the result against the original "
        "in ONNX Runtime, and store a new version."
    )
    parser.add_argument("onnx", type=Path, help="the ONNX file")
    parser.add_argument(
        "--input-shape",
        type=_named_ints,
        action="append",
        help="one sample's shape, where the graph leaves it symbolic; for several inputs, each "
        "one's by name: --input-shape tokens=128 --input-shape mask=128",
    )
    _add_common(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    _configure_logging()
    command = "foldserve " + shlex.join(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "export":
            return _export(args, command)
        return _import(args, command)
    except FoldserveError as exc:
        name = getattr(args, "name", None) or getattr(args, "arch", "the model")
        print(f"refused: {name} was not stored: {exc.message}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if exc.name not in ("torch", "PIL", "monai", "onnxscript", "sklearn", "tqdm"):
            raise
        print(
            f"foldserve {args.command} needs the training extra (no module {exc.name!r}): "
            "pip install 'foldserve[train]'",
            file=sys.stderr,
        )
        return 2


def _train(args: argparse.Namespace) -> int:
    from foldserve.demos.build import run
    from foldserve.demos.models import get_architecture
    from foldserve.demos.train import TrainConfig

    if args.epochs is not None and args.epochs < 1:
        print(f"error: --epochs must be at least 1, got {args.epochs}", file=sys.stderr)
        return 2
    arch = get_architecture(args.arch)
    config = TrainConfig(
        arch=arch.name,
        seed=args.seed,
        epochs=args.epochs if args.epochs is not None else arch.default_epochs,
        bn_stats=args.bn_stats,
    )
    result = run(config, args.store)
    acc = result.accuracies
    rows = [
        ("held-out accuracy, ema statistics", f"{acc.ema:.4f}"),
        ("held-out accuracy, population statistics", f"{acc.population:.4f}"),
        (
            f"held-out accuracy, unfolded with {config.bn_stats} (exported)",
            f"{acc.exported_stats:.4f}",
        ),
        ("held-out accuracy, the ONNX file", f"{acc.onnx:.4f}"),
    ]
    print(summary(result.path, result.manifest, result.seconds, rows))
    return 0


def _export(args: argparse.Namespace, command: str) -> int:
    from foldserve import calibration
    from foldserve.from_module import export, load_module

    model = load_module(args.model, args.model_kwargs, args.checkpoint)
    source = args.model + (f" with {json.dumps(args.model_kwargs)}" if args.model_kwargs else "")
    if args.checkpoint is not None:
        source += f", checkpoint {args.checkpoint}"
    shapes = _input_shapes(args.input_shape)
    if isinstance(shapes, list):
        data = _calibration(args, tuple(shapes), calibration)
    elif args.calibration is not None:  # several inputs: an .npz of one array per input
        specs = tuple(TensorSpec(name=n, shape=tuple(d)) for n, d in shapes.items())
        data = calibration.load_inputs(Path(args.calibration), specs, limit=args.calibration_limit)
    else:
        data = None
    result = export(
        model,
        shapes,
        store=args.store,
        name=args.name,
        labels=args.labels,
        task=args.task,
        bn_stats=args.bn_stats,
        calibration=data,
        seed=args.seed,
        progress=sys.stderr.isatty(),
        command=command,
        source=source,
        max_batch_size=args.max_batch_size,
        image_mean=args.image_mean,
        image_std=args.image_std,
        image_channels=args.image_channels,
        image_layout=args.image_layout,
        output_names=args.output_names,
    )
    print(summary(result.path, result.build.manifest, result.build.seconds))
    return 0


def _import(args: argparse.Namespace, command: str) -> int:
    from foldserve import calibration
    from foldserve.from_onnx import import_onnx

    shape = _input_shapes(args.input_shape) if args.input_shape else None

    def data(inputs: tuple[TensorSpec, ...]) -> Any:  # the file tells the inputs
        if len(inputs) == 1:
            return _calibration(args, inputs[0].shape, calibration)
        return calibration.load_inputs(Path(args.calibration), inputs, limit=args.calibration_limit)

    result = import_onnx(
        args.onnx,
        store=args.store,
        name=args.name,
        labels=args.labels,
        task=args.task,
        calibration=data if args.calibration is not None else None,
        input_shape=shape,
        seed=args.seed,
        command=command,
        max_batch_size=args.max_batch_size,
        image_mean=args.image_mean,
        image_std=args.image_std,
        image_channels=args.image_channels,
        image_layout=args.image_layout,
    )
    extra = [("batch dimension", "made dynamic")] if result.batch_made_dynamic else []
    print(summary(result.path, result.build.manifest, result.build.seconds, extra))
    return 0


def _calibration(args: argparse.Namespace, shape: tuple[int, ...], calibration: Any) -> Any:
    if args.calibration is None:
        return None
    return calibration.load(
        args.calibration,
        shape,
        key=args.calibration_key,
        mean=args.image_mean,
        std=args.image_std,
        limit=args.calibration_limit,
        channels=args.image_channels,
        layout=args.image_layout or "CHW",
    )


def _bitwise_rows(manifest: Manifest) -> str:
    """The batch sizes the bitwise check covered, against the row cap it is bounded by."""
    from foldserve.verify_export import EXPORT_CHECK_VALUES

    measured, cap = manifest.verification.bitwise_max_rows, manifest.batching.max_batch_size
    if measured is None or measured >= cap:
        return f"1..{measured or cap} rows"
    bound = f"{EXPORT_CHECK_VALUES / 1e6:.1f}M input values"
    return f"1..{measured} of the cap's {cap} rows: the check stops at {bound}"


def summary(
    path: Path,
    manifest: Manifest,
    seconds: dict[str, float],
    extra: list[tuple[str, str]] | None = None,
) -> str:
    """What was stored and what was proven, as a short table."""
    from foldserve.pipeline import describe_task

    check, origin = manifest.verification, manifest.provenance
    bitwise = {True: "yes", False: "no", None: "not measured"}[check.bitwise_batch_invariant]
    rows = [
        *(extra or []),
        ("inputs", _tensors(manifest.inputs)),
        ("outputs", _tensors(manifest.outputs)),
        ("task", describe_task(manifest)),
        *((("images", _image(manifest.image)),) if manifest.image is not None else ()),
        ("statistics", origin.bn_stats),
        ("checked on", origin.calibration or "-"),
        ("folded with", origin.fold_path),
        *(
            (
                f"max |{fmt} - unfolded eval model|",
                f"{diff:.3g} ({check.max_rel_diff.get(fmt, 0):.2g} rel)",
            )
            for fmt, diff in check.max_abs_diff.items()
        ),
        ("max change of an output alone vs in a batch", f"{check.batch_invariance_max_diff:.3g}"),
        (f"bitwise batch-invariant (ONNX Runtime, {_bitwise_rows(manifest)})", bitwise),
        ("tolerance (atol, rtol of each sample's scale)", f"{check.atol:g}, {check.rtol:g}"),
        ("samples compared", str(check.samples_checked)),
        ("batch-statistics ops left", str(check.batch_statistics_ops)),
        *((f"seconds: {step}", f"{value:.1f}") for step, value in seconds.items()),
    ]
    if origin.dtype_conversion:
        rows.insert(0, ("converted", origin.dtype_conversion))
    width = max(len(label) for label, _ in rows)
    lines = [f"stored {manifest.name} version {manifest.version} at {path}", ""]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    lines += ["", *_batch_norm_table(manifest.batch_norm)]
    files = ", ".join(f"{f.path} ({f.size_bytes / 1024:.0f} KiB)" for f in manifest.files)
    lines += ["", f"files: {files}", f"reproduce: {origin.command}"]
    return "\n".join(lines)


def _image(image: ImageInput) -> str:
    size = "x".join(map(str, image.size))
    numbers = ", ".join(f"{m:g}/{s:g}" for m, s in zip(image.mean, image.std, strict=True))
    return (
        f"PNG and JPEG taken: {image.channels} {size}, bilinear, pixels/255, (x - mean)/std "
        f"per channel {numbers}, {image.layout}"
    )


def _tensors(specs: tuple[TensorSpec, ...]) -> str:
    """Each tensor's name and per-sample shape, as a request names them."""
    return ", ".join(f"{spec.name} {'x'.join(map(str, spec.shape))}" for spec in specs)


def _batch_norm_table(records: tuple[BatchNormRecord, ...]) -> list[str]:
    if not records:
        return ["  no BatchNorm layers"]
    width = min(40, max(16, *(len(bn.name) for bn in records)))
    lines = [f"  {'BatchNorm':<{width}} {'features':>8}  {'placement':<22} {'shift':>7}  target"]
    for bn in records:
        shift = f"{bn.stats_shift.max_mean_shift:7.3f}" if bn.stats_shift else f"{'-':>7}"
        lines.append(
            f"  {bn.name:<{width}} {bn.features:>8}  {bn.placement:<22} {shift}  {bn.target or '-'}"
        )
    return lines


def _labels(given: str) -> list[str]:
    """``--labels``: read when the command line is, so that a wrong one stops before any work."""
    inline = given.lstrip().startswith("[")
    if inline:
        text, where = given, "the JSON list given"
    else:
        try:
            text, where = Path(given).read_text(), given
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"cannot read labels file {given!r} ({exc.strerror or exc}): give a file with one "
                "label per line or a JSON list, or the JSON list itself"
            ) from exc
    if inline or text.lstrip().startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{where}: not a JSON list ({exc.msg})") from exc
        if not isinstance(parsed, list) or not all(isinstance(x, str | int) for x in parsed):
            raise argparse.ArgumentTypeError(f"{where}: a JSON list of strings was expected")
        labels = [str(label) for label in parsed]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise argparse.ArgumentTypeError(f"{where}: holds no labels")
    repeated = sorted(label for label, n in Counter(labels).items() if n > 1)
    if repeated:
        raise argparse.ArgumentTypeError(f"{where}: labels given more than once: {repeated[:5]}")
    return labels


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers like 3,224,224, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 3,224,224, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names like scores,mask, got {text!r}")
    return names


def _named_ints(text: str) -> tuple[str | None, list[int]]:
    """``3,224,224`` or ``image=3,224,224``."""
    name, _, dims = text.rpartition("=")
    return (name or None), _ints(dims)


def _input_shapes(given: list[tuple[str | None, list[int]]]) -> list[int] | dict[str, list[int]]:
    """One unnamed shape, or several named ones (each name once)."""
    if len(given) == 1 and given[0][0] is None:
        return given[0][1]
    names = [name for name, _ in given]
    if None in names or len(set(names)) != len(names):
        raise FoldingError(
            "--input-shape: give one sample's shape once, or each input's by name once "
            "(--input-shape image=3,224,224 --input-shape meta=5)"
        )
    return {str(name): dims for name, dims in given}


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected numbers like 0.485,0.456,0.406: {text!r}"
        ) from exc


def _configure_logging() -> None:
    # Our own INFO lines (e.g. the TorchScript deprecation note); third-party chatter stays at
    # WARNING. Leave logging alone if the host program already set it up.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("foldserve").setLevel(logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
