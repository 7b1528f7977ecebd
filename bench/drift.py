"""What drift monitoring costs a request: ``.venv/bin/python -m bench.drift [--requests N]``.

In one process, on the shipped store, with the server's own registry and dataplane:

1. ``DataPlane.infer`` of a 1-row request, one at a time (the request's own serving time);
2. ``observe`` per request, on the loop (what ``DataPlane.infer`` adds on its path);
3. the time the loop spends in fold-ins during those requests, per request (they run later, at
   most every FOLD_EVERY_S), and one fold-in of 64 and of 512 pending requests;
4. as a cross-check, alternating rounds with the model's monitor and with an inert one (a model
   without input BN): the difference of whole requests, which noise dominates at this scale.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from service.dataplane import DataPlane, InferenceResult
from service.drift import DriftMonitor
from service.metrics import Metrics
from service.registry import Registry
from service.settings import Settings

STORE = Path(__file__).resolve().parents[1] / "model_store"
MODELS = ("digits-mlp", "digits-cnn")
ROUNDS = 10


def _fold_costs(monitor: DriftMonitor, sample: np.ndarray) -> dict[str, float]:
    """One fold-in of 64 and of 512 pending 1-row requests (best of 5 x 50)."""
    row = sample[:1]
    out: dict[str, float] = {}
    for pending in (64, 512):
        best = float("inf")
        for _ in range(5):
            spent = 0.0
            for _ in range(50):
                for _ in range(pending):
                    monitor.observe(row)
                started = time.perf_counter()
                monitor.fold_pending()
                spent += time.perf_counter() - started
            best = min(best, spent / 50)
        out[f"fold_{pending}_us"] = best * 1e6
    return out


async def _infer_rounds(dataplane: DataPlane, model: str, requests: int) -> dict[str, float]:
    entry = dataplane.registry.resolve(model, None)
    real, inert = entry.drift, DriftMonitor(None)
    assert entry.manifest is not None
    spec = entry.manifest.inputs[0].shape
    row = np.asarray(entry.manifest.golden.inputs[:1], dtype=np.float32).reshape(1, *spec)
    folding = [0.0]  # seconds spent folding during the monitored rounds
    fold = real.fold_pending

    def timed_fold() -> None:
        started = time.perf_counter()
        fold()
        folding[0] += time.perf_counter() - started

    real.fold_pending = timed_fold  # type: ignore[method-assign]

    def encode(result: InferenceResult) -> int:
        return len(result.outputs)

    async def one_round(monitor: DriftMonitor) -> float:
        entry.drift = monitor
        started = time.perf_counter()
        for _ in range(requests):
            await dataplane.infer(model, None, row, encode)
        await asyncio.sleep(0)  # a fold-in scheduled in this round is part of its cost
        return (time.perf_counter() - started) / requests

    async def observes() -> float:
        started = time.perf_counter()
        for _ in range(requests):
            real.observe(row)  # as on the request path: on the loop, scheduling a fold-in
        return (time.perf_counter() - started) / requests

    await one_round(real)  # warm up
    observe_us = min([await observes() for _ in range(5)]) * 1e6
    real.fold_pending()
    on, off = [], []
    folding[0] = 0.0
    for _ in range(ROUNDS):
        off.append(await one_round(inert))
        on.append(await one_round(real))
    entry.drift = real
    diffs = sorted(a - b for a, b in zip(on, off, strict=True))
    return {
        "observe_loop_us": observe_us,
        "fold_share_us": folding[0] / (ROUNDS * requests) * 1e6,
        "infer_off_us": statistics.median(off) * 1e6,
        "infer_on_us": statistics.median(on) * 1e6,
        "ab_diff_us": statistics.median(diffs) * 1e6,
        "ab_spread_us": (diffs[-2] - diffs[1]) * 1e6,
    }


async def _measure(requests: int) -> dict[str, dict[str, float]]:
    settings = Settings(model_store=STORE, adaptive_delay=True)
    metrics = Metrics(CollectorRegistry())
    registry = Registry(settings, metrics)
    await registry.load_all()
    dataplane = DataPlane(registry, metrics)
    out: dict[str, dict[str, float]] = {}
    try:
        for model in MODELS:
            entry = registry.resolve(model, None)
            assert entry.manifest is not None
            sample = np.asarray(entry.manifest.golden.inputs, dtype=np.float32)
            sample = sample.reshape(len(sample), *entry.manifest.inputs[0].shape)
            spare = DriftMonitor.for_manifest(entry.manifest)
            out[model] = {
                **_fold_costs(spare, sample),
                **await _infer_rounds(dataplane, model, requests),
            }
    finally:
        await registry.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="1-row requests per round")
    args = parser.parse_args()
    results = asyncio.run(_measure(args.requests))
    print(
        f"{'model':11s} {'infer 1 row':>11s} {'observe':>8s} {'fold share':>10s} "
        f"{'added':>7s} {'added/infer':>11s} {'fold 64 rows':>12s} {'fold 512':>9s} "
        f"{'A/B on-off (spread)':>20s}"
    )
    for model, r in results.items():
        added = r["observe_loop_us"] + r["fold_share_us"]
        print(
            f"{model:11s} {r['infer_off_us']:9.1f}us {r['observe_loop_us']:6.2f}us "
            f"{r['fold_share_us']:8.2f}us {added:5.2f}us {added / r['infer_off_us']:11.2%} "
            f"{r['fold_64_us']:10.1f}us {r['fold_512_us']:7.1f}us "
            f"{r['ab_diff_us']:+9.1f}us ({r['ab_spread_us']:.1f}us)"
        )
    print(
        f"\n{ROUNDS} alternating rounds of {args.requests} sequential 1-row requests through "
        "DataPlane.infer in process (medians). observe: per request, on the loop; fold share: "
        "time in fold-ins during the monitored rounds / requests; added = observe + fold share. "
        "A/B: median per-round difference of the whole request with the monitor and with an "
        "inert one (spread: 2nd lowest to 2nd highest), dominated by noise at this scale."
    )


if __name__ == "__main__":
    main()
