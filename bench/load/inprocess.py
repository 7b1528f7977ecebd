"""References without HTTP: onnxruntime alone (the compute limit) and the batcher's own cost."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from load.cases import STORE, manifest


def onnxruntime(
    models: list[str], seconds: float, batches: tuple[int, ...] = (1, 64)
) -> dict[str, dict[str, float]]:
    """session.run in a loop at each batch size, with foldserve's session options."""
    from service.backends import BackendOptions
    from service.backends.onnx import OnnxBackend

    out: dict[str, dict[str, float]] = {}
    for model in models:
        backend = OnnxBackend(STORE / model / "1" / "model.onnx", BackendOptions("cpu", 1))
        shape = tuple(manifest(model)["inputs"][0]["shape"])
        golden = np.asarray(manifest(model)["golden"]["inputs"], dtype=np.float32)
        for batch in batches:
            x = np.resize(golden, (batch, golden.shape[1])).reshape(batch, *shape)
            for _ in range(50):
                backend.run(x)
            times = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                backend.run(x)
                times.append(time.perf_counter() - t)
            out[f"{model}/batch{batch}"] = {
                "batch": batch,
                "calls": len(times),
                "median_call_us": statistics.median(times) * 1e6,
                "calls_per_s": len(times) / sum(times),
                "samples_per_s": batch * len(times) / sum(times),
            }
    return out


def json_parse(body: bytes, seconds: float) -> dict[str, float]:
    """What parsing a JSON request body costs in-process: orjson.loads, then the float32 array.

    NOTE: the bound of issue 17 for a JSON request adds this to bare's cost and the model's: it is
    measured on the exact bytes the load generator sends, so a server may spend that, not more.
    """
    import orjson

    def parse(text: bytes) -> None:
        np.asarray(orjson.loads(text)["inputs"], dtype=np.float32)

    for _ in range(20):
        parse(body)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        times.append(_timed(parse, body))
    return {"bytes": len(body), "calls": len(times), "median_us": statistics.median(times) * 1e6}


def _timed(fn: Callable[[Any], Any], arg: Any) -> float:
    started = time.perf_counter()
    fn(arg)
    return time.perf_counter() - started


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, float]], float]:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def batcher_overhead(model: str, calls: int) -> dict[str, Any]:
    """p50 of one lone request through Batcher.submit vs calling the backend directly.

    Concurrency 1 in-process: each call waits for the previous. "default" is the batcher as the
    server builds it by default (the manifest's delay, adaptive delay on, inline when a full
    batch is faster than Settings.inline_max_ms); "delay0" is a worker-thread batcher with no
    wait: only its machinery (queue, executor hop, future) remains.
    """
    from service.backends import BackendOptions
    from service.backends.onnx import OnnxBackend
    from service.batching import Batcher
    from service.settings import Settings

    backend = OnnxBackend(STORE / model / "1" / "model.onnx", BackendOptions("cpu", 1))
    x = np.asarray(manifest(model)["golden"]["inputs"][:1], dtype=np.float32)
    default_delay = float(manifest(model)["batching"]["max_delay_ms"])

    def direct() -> float:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            backend.run(x)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    defaults = Settings()
    full = np.resize(x, (64, *x.shape[1:]))
    full_batch_ms = min(_timed(backend.run, full) for _ in range(5)) * 1e3
    inline = full_batch_ms < defaults.inline_max_ms

    async def through(delay_ms: float, adaptive: bool, inline: bool) -> float:
        batcher = Batcher(
            backend.run,
            max_batch_size=64,
            max_delay_ms=delay_ms,
            adaptive_delay=adaptive,
            inline=inline,
        )
        await batcher.start()
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            await batcher.submit(x)
            times.append(time.perf_counter() - t)
            await asyncio.sleep(0)  # the loop turns between requests, as between a client's
        await batcher.stop()
        return statistics.median(times)

    run = _event_loop_runner()
    direct()  # warm up
    base = direct()
    zero = run(through(0.0, False, False))
    default = run(through(default_delay, defaults.adaptive_delay, inline))
    return {
        "model": model,
        "calls": calls,
        "default_max_delay_ms": default_delay,
        "default_adaptive_delay": defaults.adaptive_delay,
        "default_inline": inline,
        "direct_p50_us": base * 1e6,
        "batcher_delay0_p50_us": zero * 1e6,
        "batcher_default_p50_us": default * 1e6,
        "added_delay0_ms": (zero - base) * 1e3,
        "added_default_ms": (default - base) * 1e3,
    }
