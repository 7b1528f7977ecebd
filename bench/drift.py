"""What drift monitoring costs: ``.venv/bin/python -m bench.drift [--seconds S]``.

In one process, on the shipped store (digits-mlp, digits-cnn), and on ResNet-50's stem at
3 x 224 x 224 (random weights: the cost depends on the shapes only), the largest layer a monitor
may have to map:

1. ``backend 1 row``: the model's own ``run`` of one row (ONNX Runtime), what a request costs;
2. ``observe``: per request, on the event loop (all that ``DataPlane.infer`` adds on its path);
3. ``fold CPU/sample``: the fold thread's CPU per row, every row folded (no budget), all layers;
4. with the default budget, requests served as fast as the backend answers them for S seconds
   (one core's capacity): the fold thread's CPU as a share of one core, and the share of the
   rows each layer folded (the rest is sampled out).

CPU is the fold thread's own clock (``time.thread_time`` read inside it): numpy's BLAS runs in
that thread alone once it is pinned (``service.drift_thread``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.backends import Array, BackendOptions, load_backend
from service.drift import CPU_BUDGET, DriftMonitor
from service.drift_layer import HiddenLayer
from service.drift_thread import FoldThread
from service.monitor_maps import Conv2dMap
from service.store import HiddenStatistics, InputStatistics, Manifest, SideFile, read_manifest

STORE = Path(__file__).resolve().parents[1] / "model_store"
MODELS = ("digits-mlp", "digits-cnn")
STEM_IMAGES_PER_S = 25.0  # about what ResNet-50 serves per core on CPU


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[FoldThread, float | None], DriftMonitor]  # (thread, budget) -> monitor
    row: Array  # one request of one row
    serve: Callable[[Array], object] | None  # the backend; None: observed at STEM_IMAGES_PER_S


def thread_cpu(thread: FoldThread) -> float:
    """The fold thread's CPU seconds so far, read inside it."""
    box: list[float] = []
    done = threading.Event()

    def read() -> None:
        box.append(time.thread_time())
        done.set()

    thread.submit(read)
    done.wait(10)
    return box[0]


def observe_us(case: Case) -> float:
    """One request's observe on a running loop, the fold thread folding meanwhile (best of 5)."""
    monitor = case.make(FoldThread("bench-observe"), CPU_BUDGET)

    async def rounds() -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(2000):
                monitor.observe(case.row)
            best = min(best, (time.perf_counter() - started) / 2000)
            await asyncio.sleep(0.06)  # a fold empties the pending list
        return best

    return asyncio.run(rounds()) * 1e6


def traffic(case: Case, budget: float | None, seconds: float) -> tuple[DriftMonitor, float, float]:
    """Serve and observe one-row requests back to back (or at STEM_IMAGES_PER_S) for
    ``seconds``; the monitor, the fold thread's CPU seconds and the wall seconds."""
    thread = FoldThread(f"bench-{case.name}")
    monitor = case.make(thread, budget)
    monitor.observe(case.row[:0])  # starts the thread: its start is not counted below
    assert monitor.flush()
    cpu, started = thread_cpu(thread), time.monotonic()
    while time.monotonic() - started < seconds:
        if case.serve is not None:
            case.serve(case.row)
        else:
            time.sleep(1 / STEM_IMAGES_PER_S)
        monitor.observe(case.row)
    assert monitor.flush(60)
    return monitor, thread_cpu(thread) - cpu, time.monotonic() - started


def backend_us(case: Case) -> float:
    assert case.serve is not None
    for _ in range(200):
        case.serve(case.row)
    timings = []
    for _ in range(2000):
        started = time.perf_counter()
        case.serve(case.row)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e6


def resnet50_stem() -> tuple[InputStatistics, HiddenLayer]:
    """ResNet-50's input BN and first convolution (3 -> 64 channels, 7 x 7, stride 2, padding 3:
    9,408 weights over 112 x 112 positions) and the BN it feeds; random weights."""
    weight = np.random.default_rng(0).normal(0.0, 0.05, (64, 3, 7, 7)).astype(np.float32)
    stem = Conv2dMap(
        np.ascontiguousarray(weight.reshape(64, -1).T), np.zeros(64, np.float32),
        np.zeros(3, np.float32), (7, 7), (2, 2), (3, 3), (3, 224, 224),
    )  # fmt: skip
    side = SideFile(path="monitor-bn1.npz", sha256="0" * 64, size_bytes=1)
    statistics = HiddenStatistics(
        layer="bn1", map="conv2d", map_from="conv1", through="input_norm", stride=(2, 2),
        padding=(3, 3), file=side, axis="channel", source="ema", mean=(0.0,) * 64,
        var=(0.5,) * 64, eps=1e-5,
    )  # fmt: skip
    inputs = InputStatistics(
        layer="input_norm", axis="channel", source="ema", mean=(0.0,) * 3, var=(1.0,) * 3, eps=1e-5
    )
    return inputs, HiddenLayer(statistics, stem)


def monitor_factory(
    reference: InputStatistics | None, hidden: list[HiddenLayer]
) -> Callable[[FoldThread, float | None], DriftMonitor]:
    def make(thread: FoldThread, budget: float | None) -> DriftMonitor:
        return DriftMonitor(reference, hidden=hidden, budget=budget, thread=thread)

    return make


def shipped(name: str) -> Case:
    directory = STORE / name / "1"
    manifest: Manifest = read_manifest(directory)
    hidden = list(DriftMonitor.for_manifest(manifest, directory=directory).hidden)
    backend = load_backend("onnx", directory / "model.onnx", BackendOptions())
    shape = manifest.inputs[0].shape
    row = np.asarray(manifest.golden.inputs[:1], dtype=np.float32).reshape(1, *shape)
    return Case(name, monitor_factory(manifest.input_statistics, hidden), row, backend.run)


def cases() -> list[Case]:
    inputs, stem = resnet50_stem()
    image = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    return [
        *(shipped(name) for name in MODELS),
        Case("resnet50-stem", monitor_factory(inputs, [stem]), image, None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="of budgeted traffic")
    args = parser.parse_args()
    print(
        f"{'model':14s} {'backend 1 row':>13s} {'observe':>8s} {'fold CPU/sample':>16s} "
        f"{'budgeted: fold CPU':>19s} {'rows folded per layer':>24s}"
    )
    for case in cases():
        every, every_cpu, _ = traffic(case, None, min(args.seconds, 2.0))
        per_sample = every_cpu / max(1, every.report().samples_folded) * 1e6
        budgeted, cpu, wall = traffic(case, CPU_BUDGET, args.seconds)
        report = budgeted.report()
        folded = [report.samples_folded, *(h.samples_folded for h in report.hidden)]
        shares = " ".join(f"{n / max(1, report.samples_observed):.0%}" for n in folded)
        backend = "-" if case.serve is None else f"{backend_us(case):.1f}us"
        print(
            f"{case.name:14s} {backend:>13s} {observe_us(case):6.2f}us "
            f"{per_sample:14.1f}us {cpu / wall:18.2%} {shares:>24s}"
        )
    print(
        f"\nbackend 1 row: the model's own run (median). observe: per request, on the loop "
        f"(best of 5 x 2000). fold CPU/sample: the fold thread's CPU per row, every row folded, "
        f"input and hidden layers together. budgeted: {args.seconds:.0f} s of one-row requests "
        f"served back to back (the stem: {STEM_IMAGES_PER_S:.0f} images/s) with the default "
        f"budget ({CPU_BUDGET:.0%} of a core): the fold thread's CPU / wall time, and the share "
        "of the rows each layer folded (input, then hidden)."
    )


if __name__ == "__main__":
    main()
