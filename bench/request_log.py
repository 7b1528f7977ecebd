"""What request ids and the access log cost: one-sample ``/predict`` requests driven in-process.

    .venv/bin/python -m bench.request_log [--requests 300] [--rounds 31] [--model digits-mlp]

The real app (``create_app`` on the shipped store, models loaded and verified) is handed requests
as the connection hands them over (head parsed, body received), without sockets or a parser:
alone, and through the server's own per-request layer (``HttpServer.answer``: the request's id
in the log context, the access line). The figures are the event loop thread's CPU time per
request (``thread_time``), with the model run inline and no batch wait; other processes' load
does not count. Variants run interleaved in short rounds, in a shuffled order each round, on one
event loop; the table gives a variant's median over the rounds and its ratio to the app alone.
Access lines go to ``os.devnull`` through a real handler and formatter: the formatting and the
write are counted, what a terminal or a log shipper adds is not.
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

from service.app import AccessLog, Service, create_app
from service.http.context import ACCESS_LOGGER, RequestIds
from service.http.limits import HttpLimits
from service.http.request import KNOWN, Body, Head, Request
from service.http.response import Response
from service.http.server import HttpServer
from service.logs import formatter
from service.settings import Settings

STORE = Path(__file__).resolve().parents[1] / "model_store"


@dataclass(frozen=True)
class Variant:
    name: str
    access_log: Callable[[], AccessLog | None] | None  # None: the app alone, no server around it
    log_format: str = "text"


VARIANTS = (
    Variant("the app alone (no server layer)", None),
    Variant("request id, access log off (default)", lambda: None),
    Variant("access log on, sample 0.1, json", lambda: AccessLog(0.1, False), "json"),
    Variant("access log on, sample 1.0, text", lambda: AccessLog(1.0, False), "text"),
    Variant("access log on, sample 1.0, json", lambda: AccessLog(1.0, False), "json"),
)


class _Flow:
    def want_body(self, body: Body) -> None:
        pass

    def body_waiting(self, body: Body) -> None:
        pass


class Client:
    """One-sample /predict requests as the connection hands them over: head parsed (with its
    id), body received."""

    def __init__(self, path: str, body: bytes) -> None:
        self.path, self.body = path, body
        self.headers = [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        self.ids = RequestIds()

    def request(self, method: str = "POST", path: str | None = None) -> Request:
        head = Head()
        for name, value in self.headers:
            known = KNOWN.get(name)
            if known is not None:
                setattr(head, known, value)
        body = Body(_Flow())
        if method == "POST":
            body.feed(self.body)
        body.end()
        path = path or self.path
        loop = asyncio.get_running_loop()
        return Request(
            method, path.encode(), path, b"", self.headers, head,
            client=("127.0.0.1", 50000), request_id=self.ids.of(head),
            started=time.perf_counter(), arrived=loop.time(), body=body,
        )  # fmt: skip


async def _call(app: Service, server: HttpServer | None, request: Request) -> int:
    response: Response = (
        await app.handle(request) if server is None else await server.answer(request, False)
    )
    return response.status


async def measure(model: str, requests: int, rounds: int) -> dict[str, list[float]]:
    # NOTE: no batch wait: one request at a time never has batch mates, and a timer's wait
    # would be counted as the request's time. CPU time is measured anyway (thread_time).
    settings = Settings(model_store=STORE, default_model=model, log_level="warning", max_delay_ms=0)
    app = create_app(settings)
    sample = np.asarray(_golden(model)[:1]).tolist()
    client = Client(f"/models/{model}/predict", orjson.dumps({"inputs": sample}))
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO)
    access.propagate = False
    sink = open(os.devnull, "w")  # noqa: SIM115  closed below
    handler = logging.StreamHandler(sink)
    access.addHandler(handler)
    per_request: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    order = random.Random(0)
    await app.startup()
    try:
        deadline = time.monotonic() + 60
        while not app.registry.readiness()[0]:
            assert time.monotonic() < deadline, "models did not load"
            await asyncio.sleep(0.05)
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for variant in order.sample(VARIANTS, len(VARIANTS)):  # no position bias
                server = (
                    None
                    if variant.access_log is None
                    else HttpServer(app, HttpLimits(), access_log=variant.access_log())
                )
                handler.setFormatter(formatter(variant.log_format))  # type: ignore[arg-type]
                started = time.thread_time()
                for _ in range(requests):
                    status = await _call(app, server, client.request())
                    await asyncio.sleep(0)  # the loop turns between requests, as in a server
                elapsed = time.thread_time() - started
                assert status == 200, status
                per_request[variant.name].append(elapsed / requests)
    finally:
        await app.shutdown()
        access.removeHandler(handler)
        access.propagate = True
        sink.close()
    return {name: times[1:] for name, times in per_request.items()}


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
        "| variant | CPU us/request (median) | min-max | req/CPU-s | vs the app | (fastest) |",
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
        "per variant, in-process (no sockets), event loop thread CPU:\n"
    )
    print(report(results))


def _event_loop_runner() -> Callable[[Any], Any]:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


if __name__ == "__main__":
    main()
