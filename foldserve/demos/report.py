"""Print the BN report in docs/: EMA vs population statistics, and folded vs unfolded differences.

Run: ``python -m foldserve.demos.report [--seeds 0 1 2] [--short-epochs 3]``. Every architecture is
trained at its default epochs and, to show where frozen statistics matter most, at a few epochs
only; each run goes through the whole pipeline (fold, export, verify) into a temporary store.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from foldserve.demos.build import PipelineResult, run
from foldserve.demos.models import ARCHITECTURES, get_architecture
from foldserve.demos.train import TrainConfig


def _row(arch: str, epochs: int, results: list[PipelineResult]) -> str:
    def mean(values: list[float]) -> str:
        return f"{statistics.fmean(values):.4f}"

    ema = [r.accuracies.ema for r in results]
    population = [r.accuracies.population for r in results]
    onnx_diff = max(r.manifest.verification.max_abs_diff["onnx"] for r in results)
    ts_diff = max(r.manifest.verification.max_abs_diff["torchscript"] for r in results)
    invariance = max(r.manifest.verification.batch_invariance_max_diff for r in results)
    wins = sum(p > e for p, e in zip(population, ema, strict=True))
    losses = sum(p < e for p, e in zip(population, ema, strict=True))
    return (
        f"| {arch} | {epochs} | {mean(ema)} | {mean(population)} | {wins}/{losses} "
        f"| {onnx_diff:.2e} | {ts_diff:.2e} | {invariance:.2e} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foldserve.demos.report", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--short-epochs", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        "| architecture | epochs | accuracy, EMA stats | accuracy, population stats "
        "| population better/worse (runs) | max abs diff ONNX vs unfolded "
        "| max abs diff TorchScript vs unfolded | max change alone vs batched |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as store:
        for name in sorted(ARCHITECTURES):
            arch = get_architecture(name)
            for epochs in (arch.default_epochs, args.short_epochs):
                results = [
                    run(
                        TrainConfig(arch=name, seed=seed, epochs=epochs),
                        Path(store),
                        progress=False,
                    )
                    for seed in args.seeds
                ]
                print(_row(name, epochs, results), flush=True)
    print(f"\nseeds {args.seeds}; accuracy is on the held-out split, averaged over seeds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
