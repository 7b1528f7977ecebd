"""What request ids and the access log cost: one-sample ``/predict`` requests driven in-process.

    .venv/bin/python -m bench.request_log [--requests 300] [--rounds 31] [--model digits-mlp]

The real app (``create_app`` on the shipped store, models loaded and verified) is called as ASGI,
without sockets or an HTTP parser. The figures are the event loop thread's CPU time per request
(``thread_time``): the app's own work, which the request id and the access log add to, with the
model run inline and no batch wait; other processes' load does not count. Variants run
interleaved in short rounds, in a shuffled order each round, on one event loop; each table gives
a variant's median over the rounds and its ratio to the app without the request-id wrapper. The
second table times the wrapper alone, around an ASGI app that only answers 204: the added cost
without the noise of the app around it. Access lines go to ``os.devnull`` through a real handler
and formatter: the formatting and the write are counted, what a terminal or a log shipper adds
is not.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from starlette.types import Message

from service.app import FoldserveApp, create_app
from service.logs import formatter
from service.request_context import ACCESS_LOGGER, RequestLog
from service.settings import Settings

STORE = Path(__file__).resolve().parents[1] / "model_store"


@dataclass(frozen=True)
class Variant:
    name: str
    request_log: Callable[[], RequestLog | None]
    log_format: str = "text"


VARIANTS = (
    Variant("no wrapper (request_log=None)", lambda: None),
    Variant("request id, access log off (default)", lambda: RequestLog(access_log=False)),
    Variant("access log on, sample 0.1, json", lambda: RequestLog(True, 0.1), "json"),
    Variant("access log on, sample 1.0, text", lambda: RequestLog(True, 1.0), "text"),
    Variant("access log on, sample 1.0, json", lambda: RequestLog(True, 1.0), "json"),
)


class Client:
    """One-sample /predict requests straight into the ASGI app."""

    def __init__(self, app: FoldserveApp, path: str, body: bytes) -> None:
        self.app = app
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"127.0.0.1:8000"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        self.request = {"type": "http.request", "body": body, "more_body": False}

    async def call(self) -> int:
        status = 0

        async def receive() -> dict[str, Any]:
            return self.request

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(dict(self.scope), receive, send)
        return status

    async def get(self, path: str) -> int:
        scope = dict(self.scope, method="GET", path=path, raw_path=path.encode(), headers=[])
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, send)
        return status


async def measure(model: str, requests: int, rounds: int) -> dict[str, list[float]]:
    # NOTE: no batch wait: one request at a time never has batch mates, and a timer's wait
    # would be counted as the request's time. CPU time is measured anyway (thread_time).
    settings = Settings(model_store=STORE, default_model=model, log_level="warning", max_delay_ms=0)
    app = create_app(settings)
    sample = np.asarray(_golden(model)[:1]).tolist()
    client = Client(app, f"/models/{model}/predict", orjson.dumps({"inputs": sample}))
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO)
    access.propagate = False
    sink = open(os.devnull, "w")  # noqa: SIM115  closed below
    handler = logging.StreamHandler(sink)
    access.addHandler(handler)
    per_request: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    order = random.Random(0)
    try:
        async with app.router.lifespan_context(app):
            deadline = time.monotonic() + 60
            while await client.get("/readyz") != 200:
                assert time.monotonic() < deadline, "models did not load"
                await asyncio.sleep(0.05)
            for _ in range(rounds + 1):  # the first round warms up and is dropped
                for variant in order.sample(VARIANTS, len(VARIANTS)):  # no position bias
                    app.request_log = variant.request_log()
                    handler.setFormatter(formatter(variant.log_format))  # type: ignore[arg-type]
                    started = time.thread_time()
                    for _ in range(requests):
                        status = await client.call()
                    elapsed = time.thread_time() - started
                    assert status == 200, status
                    per_request[variant.name].append(elapsed / requests)
    finally:
        access.removeHandler(handler)
        access.propagate = True
        sink.close()
    return {name: times[1:] for name, times in per_request.items()}


async def measure_alone(requests: int, rounds: int) -> dict[str, list[float]]:
    """The wrapper around an app that answers 204 at once: its own cost per request."""

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def nothing(message: Any = None) -> Any:
        return None

    app = FoldserveApp(())
    app._route = answer  # type: ignore[method-assign]  # the routing under test is the wrapper's
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"99")],
        "client": ("127.0.0.1", 50000),
    }
    access = logging.getLogger(ACCESS_LOGGER)
    handler = logging.StreamHandler(sink := open(os.devnull, "w"))  # noqa: SIM115
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    times: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    order = random.Random(0)
    try:
        for _ in range(rounds + 1):
            for variant in order.sample(VARIANTS, len(VARIANTS)):
                app.request_log = variant.request_log()
                handler.setFormatter(formatter(variant.log_format))  # type: ignore[arg-type]
                started = time.thread_time()
                for _ in range(requests):
                    await app(scope, nothing, nothing)
                times[variant.name].append((time.thread_time() - started) / requests)
    finally:
        access.removeHandler(handler)
        access.propagate = True
        sink.close()
    return {name: t[1:] for name, t in times.items()}


def _golden(model: str) -> list[list[float]]:
    manifest = orjson.loads((STORE / model / "1" / "manifest.json").read_bytes())
    inputs: list[list[float]] = manifest["golden"]["inputs"]
    return inputs


def report(results: dict[str, list[float]]) -> str:
    """Medians and their ratio to the first variant; the ratio of the fastest rounds too, which
    other processes' load disturbs least."""
    base = statistics.median(results[VARIANTS[0].name])
    base_min = min(results[VARIANTS[0].name])
    lines = [
        "| variant | CPU us/request (median) | min-max | req/CPU-s | vs no wrapper | (fastest) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, times in results.items():
        median = statistics.median(times)
        spread = f"{min(times) * 1e6:.1f}-{max(times) * 1e6:.1f}"
        lines.append(
            f"| {name} | {median * 1e6:.1f} | {spread} | {1 / median:,.0f} | "
            f"{median / base:.3f}x (+{(median - base) * 1e6:.1f} us) | "
            f"{min(times) / base_min:.3f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--requests", type=int, default=300, help="per variant per round")
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = _event_loop_runner()
    results = run(measure(args.model, args.requests, args.rounds))
    print(
        f"{args.model}, one sample per request, {args.requests} requests x {args.rounds} rounds "
        "per variant, in-process ASGI (no sockets), event loop thread CPU:\n"
    )
    print(report(results))
    alone = run(measure_alone(args.requests * 4, args.rounds))
    print(
        f"\nthe wrapper alone, around an app answering 204 ({args.requests * 4} x {args.rounds}):\n"
    )
    print(report(alone))


def _event_loop_runner() -> Callable[[Any], Any]:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


if __name__ == "__main__":
    main()
