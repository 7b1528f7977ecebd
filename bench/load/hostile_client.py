"""A hostile client that behaves as a real one: one connection sending huge bodies in a loop.

The body is built once in memory: ``{"inputs": [[...64 floats...], ...]}`` with 90,000 rows for
digits-mlp, about 60 MB (valid JSON, under the server's 64 MiB default body limit), or that body
gzip-compressed and sent with ``Content-Encoding: gzip``: about 0.4 MB on the wire that
inflate to the same 60 MB. The rows repeat 16 distinct ones, as a compression bomb would.

Each request carries a Content-Length and the whole body. The answer is read concurrently with
the sending, since a server may answer (413) before the body is all in: whatever comes is
recorded. Past an early answer the rest of the body is not sent and the connection is closed, as
HTTP clients do; on a closed connection the client connects again. No back-off.

    python -m load.hostile_client URL --kind json|gzip -d SECONDS
        prints READY once the body is built, then one HOSTILEJSON line with the tally
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ROWS = 90_000
FEATURES = 64  # digits-mlp's input
DISTINCT_ROWS = 16


def json_body(rows: int = ROWS, features: int = FEATURES, seed: int = 0) -> bytes:
    """~60 MB of valid /predict JSON (about 670 bytes a row)."""
    rng = random.Random(seed)
    distinct = [
        ("[" + ",".join(f"{rng.gauss(0, 1):.7f}" for _ in range(features)) + "]").encode()
        for _ in range(DISTINCT_ROWS)
    ]
    return b'{"inputs":[' + b",".join(distinct[i % DISTINCT_ROWS] for i in range(rows)) + b"]}"


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    answer_s: list[float] = field(default_factory=list)  # from the first byte sent to the answer
    started: int = 0  # requests begun
    sent_whole: int = 0  # bodies sent to the last byte
    answered_early: int = 0  # answers that came before the whole body was sent
    lost: int = 0  # connection closed with no answer to the request
    connects: int = 0


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One HTTP/1.1 response: its status, and whether the connection stays open after it."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {
        k.strip().lower(): v.strip().lower()
        for k, _, v in (line.partition(":") for line in head[1:] if line)
    }
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readline()
    else:  # delimited by the close
        await reader.read()
        return status, False
    return status, headers.get("connection") != "close"


async def hostile(url: str, body: bytes, gzipped: bool, seconds: float) -> Tally:
    parts = urllib.parse.urlsplit(url)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        + ("Content-Encoding: gzip\r\n" if gzipped else "")
        + "\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    t = Tally()
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while (left := end - loop.time()) > 0:
        if conn is None:
            try:
                conn = await asyncio.wait_for(
                    asyncio.open_connection(parts.hostname, parts.port), left
                )
                t.connects += 1
            except (OSError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
        reader, writer = conn
        t.started += 1
        sent_at = time.perf_counter()
        writer.write(head)
        writer.write(body)
        sending = asyncio.ensure_future(writer.drain())
        answer = asyncio.ensure_future(read_answer(reader))
        await asyncio.wait({sending, answer}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if sending.done() and sending.exception() is None:
            t.sent_whole += 1
            # The whole body is in: wait for its answer, as long as the phase lasts.
            await asyncio.wait({answer}, timeout=max(0.0, end - loop.time()))
        elif sending.done() and not answer.done():
            # The server closed while the body was going out; an answer may still be readable.
            await asyncio.wait({answer}, timeout=1.0)
        keep = False
        if answer.done() and answer.exception() is None:
            status, keep = answer.result()
            t.statuses[status] += 1
            t.answer_s.append(time.perf_counter() - sent_at)
            if not sending.done() or sending.exception() is not None:
                t.answered_early += 1
                keep = False  # the rest of the body was not sent: the connection is spent
        elif loop.time() < end:
            t.lost += 1
        for task in (sending, answer):
            task.cancel()
        await asyncio.gather(sending, answer, return_exceptions=True)
        if not keep:
            writer.transport.abort()
            conn = None
    if conn is not None:
        conn[1].transport.abort()
    return t


def summary(t: Tally, kind: str, wire: int, inflated: int, seconds: float) -> dict[str, Any]:
    times = sorted(t.answer_s)
    return {
        "kind": kind,
        "body_bytes_on_wire": wire,
        "body_bytes_inflated": inflated,
        "seconds": seconds,
        "requests_started": t.started,
        "bodies_sent_whole": t.sent_whole,
        "answers": len(times),
        "statuses": {str(k): v for k, v in sorted(t.statuses.items())},
        "answered_before_body_sent": t.answered_early,
        "lost_without_answer": t.lost,
        "connections": t.connects,
        "answer_p50_ms": 1e3 * times[len(times) // 2] if times else None,
        "answer_max_ms": 1e3 * times[-1] if times else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/models/digits-mlp/predict")
    parser.add_argument("--kind", choices=("json", "gzip"), required=True)
    parser.add_argument("-d", "--duration", type=float, required=True, help="seconds")
    args = parser.parse_args()
    inflated = json_body()
    body = gzip.compress(inflated, mtime=0) if args.kind == "gzip" else inflated
    print("READY", flush=True)
    tally = asyncio.run(hostile(args.url, body, args.kind == "gzip", args.duration))
    result = summary(tally, args.kind, len(body), len(inflated), args.duration)
    print("HOSTILEJSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
