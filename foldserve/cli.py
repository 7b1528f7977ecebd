"""``foldserve train ARCH --store DIR``: build, verify and store one model version."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from foldserve.demos.models import ARCHITECTURES, get_architecture
from foldserve.demos.train import TrainConfig
from foldserve.pipeline import PipelineResult, run
from service.errors import FoldserveError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foldserve train",
        description="Train a BatchNorm network, freeze its statistics, fold every BN away, "
        "export ONNX + TorchScript, verify them, and store a new model version.",
    )
    parser.add_argument("arch", choices=sorted(ARCHITECTURES), help="architecture to train")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        print(f"error: --epochs must be at least 1, got {args.epochs}", file=sys.stderr)
        return 2
    _configure_logging()
    arch = get_architecture(args.arch)
    config = TrainConfig(
        arch=arch.name,
        seed=args.seed,
        epochs=args.epochs if args.epochs is not None else arch.default_epochs,
        bn_stats=args.bn_stats,
    )
    try:
        result = run(config, args.store)
    except FoldserveError as exc:
        print(f"refused: {arch.name} was not stored: {exc.message}", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


def summary(result: PipelineResult) -> str:
    manifest, acc, check = result.manifest, result.accuracies, result.manifest.verification
    chosen = manifest.provenance.bn_stats
    rows = [
        ("held-out accuracy, ema statistics", f"{acc.ema:.4f}"),
        ("held-out accuracy, population statistics", f"{acc.population:.4f}"),
        (f"held-out accuracy, unfolded with {chosen} (exported)", f"{acc.exported_stats:.4f}"),
        ("held-out accuracy, the ONNX file", f"{acc.onnx:.4f}"),
        *(
            (f"max |{fmt} - unfolded eval model|", f"{diff:.3g}")
            for fmt, diff in check.max_abs_diff.items()
        ),
        ("max change of an output alone vs in a batch", f"{check.batch_invariance_max_diff:.3g}"),
        ("tolerance (atol, rtol)", f"{check.atol:g}, {check.rtol:g}"),
        ("held-out samples compared", str(check.samples_checked)),
        ("batch-statistics ops left", str(check.batch_statistics_ops)),
        *((f"seconds: {step}", f"{seconds:.1f}") for step, seconds in result.seconds.items()),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"stored {manifest.name} version {manifest.version} at {result.path}", ""]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    lines += ["", f"  {'BatchNorm':<16} {'features':>8}  {'placement':<22} target"]
    lines += [
        f"  {bn.name:<16} {bn.features:>8}  {bn.placement:<22} {bn.target or '-'}"
        for bn in manifest.batch_norm
    ]
    files = ", ".join(f"{f.path} ({f.size_bytes / 1024:.0f} KiB)" for f in manifest.files)
    lines += ["", f"files: {files}", f"reproduce: {manifest.provenance.command}"]
    return "\n".join(lines)


def _configure_logging() -> None:
    # Our own INFO lines (e.g. the TorchScript deprecation note); third-party chatter stays at
    # WARNING. Leave logging alone if the host program already set it up.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("foldserve").setLevel(logging.INFO)


if __name__ == "__main__":
    raise SystemExit(main())
