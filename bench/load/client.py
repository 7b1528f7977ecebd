"""A closed-loop HTTP/1.1 load client with a deadline: goodput, as a client with a timeout sees it.

Each of N connections sends the request and waits for the answer at most ``deadline`` seconds;
then it gives up as such a client does: it closes the connection (the server may still compute
the answer, which nobody reads) and opens a new one. Any answer, whatever its status, starts the
next request at once (no back-off, ``Retry-After`` ignored: the harshest closed loop, as wrk's).
Goodput is the number of 200s with the right answer received within the deadline, per second.

Why not wrk: its ``--timeout`` only counts a request as timed out; wrk keeps the connection and
still hands the late answer to post.lua, whose hooks see no clock, so a 200 delivered after the
deadline cannot be told from one delivered in time, nor a 503's latency from a 200's.

Every request carries ``X-Request-Timeout: <deadline>``, so a server that honours it can refuse
at once what it could not answer in time; a server that does not ignores the header.

    python -m load.client URL BODY_FILE EXPECT -c N -d SECONDS [--warmup S] [--deadline S]
        [--header-length N] [--cpu-pids 1,2]      prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httptools

from load import procfs

SWEEP_S = 0.005  # how often connections past their deadline are given up


@dataclass
class Tally:
    ok_s: list[float] = field(default_factory=list)  # 200, right answer, within the deadline
    refused_s: list[float] = field(default_factory=list)  # 503
    other_status: Counter[int] = field(default_factory=Counter)
    late_ok: int = 0  # a right 200 that came after the deadline, before the give-up swept it
    bad_answers: int = 0  # a 200 without the expected answer
    timeouts: int = 0  # given up at the deadline
    connection_errors: int = 0  # lost or refused with a request in flight


class _Connection(asyncio.Protocol):
    """One keep-alive connection; httptools parses the answers (Content-Length or chunked)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.sent_at = 0.0  # 0: nothing in flight
        self.abandoned = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.client.live.add(self)
        self.client.send(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        keep_alive = self.parser.should_keep_alive()
        self.client.answered(self, self.parser.get_status_code(), body, keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class Client:
    def __init__(
        self, url: str, request: bytes, expect: bytes, connections: int, deadline_s: float
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.request, self.expect = request, expect
        self.connections, self.deadline_s = connections, deadline_s
        self.live: set[_Connection] = set()
        self.tally = Tally()
        self.recording = False
        self.stopping = False

    def send(self, conn: _Connection) -> None:
        assert conn.transport is not None
        conn.sent_at = time.perf_counter()
        conn.transport.write(self.request)

    def answered(self, conn: _Connection, status: int, body: bytes, keep_alive: bool) -> None:
        latency = time.perf_counter() - conn.sent_at
        conn.sent_at = 0.0
        if self.recording:
            t = self.tally
            if status == 200 and self.expect in body:
                if latency <= self.deadline_s:
                    t.ok_s.append(latency)
                else:
                    t.late_ok += 1
            elif status == 200:
                t.bad_answers += 1
            elif status == 503:
                t.refused_s.append(latency)
            else:
                t.other_status[status] += 1
        if self.stopping:
            return
        if not keep_alive:
            assert conn.transport is not None
            conn.transport.close()  # connection_lost opens the next one
        else:
            self.send(conn)

    def lost(self, conn: _Connection) -> None:
        self.live.discard(conn)
        if conn.abandoned or self.stopping:
            return
        if conn.sent_at and self.recording:
            self.tally.connection_errors += 1
        self._connect_soon()

    def _connect_soon(self) -> None:
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                await loop.create_connection(lambda: _Connection(self), self.host, self.port)
                return
            except OSError:
                if self.recording:
                    self.tally.connection_errors += 1
                await asyncio.sleep(0.01)

    def _give_up_late(self) -> None:
        now = time.perf_counter()
        for conn in [c for c in self.live if c.sent_at and now - c.sent_at > self.deadline_s]:
            conn.abandoned = True
            conn.sent_at = 0.0
            self.live.discard(conn)
            if self.recording:
                self.tally.timeouts += 1
            assert conn.transport is not None
            conn.transport.abort()
            self._connect_soon()

    async def run(self, warmup_s: float, seconds: float, cpu_pids: list[int]) -> dict[str, Any]:
        failures: list[str] = []
        # NOTE: an exception in a protocol callback would only be logged, once per answer; stop
        # at the first instead, so a broken client never reports figures.
        asyncio.get_running_loop().set_exception_handler(
            lambda _, ctx: failures.append(repr(ctx.get("exception") or ctx["message"]))
        )
        for _ in range(self.connections):
            self._connect_soon()
        loop = asyncio.get_running_loop()
        end = loop.time() + warmup_s + seconds
        started = None
        while loop.time() < end:
            await asyncio.sleep(SWEEP_S)
            if failures:
                raise RuntimeError(f"load client failed: {failures[0]}")
            self._give_up_late()
            if started is None and loop.time() >= end - seconds:
                self.recording = True
                started = (
                    time.perf_counter(),
                    time.process_time(),
                    procfs.cpu_seconds(cpu_pids),
                    procfs.machine_busy_seconds(),
                )
        assert started is not None
        self._give_up_late()
        wall = time.perf_counter() - started[0]
        client_cpu = time.process_time() - started[1]
        server_cpu = procfs.cpu_seconds(cpu_pids) - started[2]
        busy = procfs.machine_busy_seconds() - started[3]
        self.recording, self.stopping = False, True
        for conn in list(self.live):
            assert conn.transport is not None
            conn.transport.abort()
        result = summary(self, wall, client_cpu, server_cpu if cpu_pids else None)
        result["other_cpu_cores"] = max(0.0, (busy - client_cpu - server_cpu) / wall)
        return result


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile in milliseconds; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return 1e3 * ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(
    client: Client, wall: float, client_cpu: float, server_cpu: float | None
) -> dict[str, Any]:
    t = client.tally
    return {
        "connections": client.connections,
        "deadline_s": client.deadline_s,
        "seconds": wall,
        "ok": len(t.ok_s),
        "goodput_per_s": len(t.ok_s) / wall,
        "ok_p50_ms": percentile_ms(t.ok_s, 50),
        "ok_p99_ms": percentile_ms(t.ok_s, 99),
        "ok_max_ms": percentile_ms(t.ok_s, 100),
        "refused": len(t.refused_s),
        "refused_per_s": len(t.refused_s) / wall,
        "refused_p50_ms": percentile_ms(t.refused_s, 50),
        "refused_p99_ms": percentile_ms(t.refused_s, 99),
        "late_ok": t.late_ok,
        "timeouts": t.timeouts,
        "bad_answers": t.bad_answers,
        "other_status": {str(k): v for k, v in sorted(t.other_status.items())},
        "connection_errors": t.connection_errors,
        "client_cpu_cores": client_cpu / wall,
        "server_cpu_cores": None if server_cpu is None else server_cpu / wall,
    }


def http_request(url: str, body: bytes, header_length: int | None, deadline_s: float) -> bytes:
    parts = urllib.parse.urlsplit(url)
    kind = "application/json" if header_length is None else "application/octet-stream"
    lines = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Content-Type: {kind}",
        f"Content-Length: {len(body)}",
        f"X-Request-Timeout: {deadline_s:g}",
    ]
    if header_length is not None:
        lines.append(f"Inference-Header-Content-Length: {header_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("body_file", type=Path)
    parser.add_argument("expect", help="substring of every right 200 answer")
    parser.add_argument("-c", "--connections", type=int, required=True)
    parser.add_argument("-d", "--duration", type=float, required=True, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--deadline", type=float, default=1.0, help="give up after, seconds")
    parser.add_argument("--header-length", type=int, help="V2 binary: JSON header's length")
    parser.add_argument("--cpu-pids", default="", help="server pids whose CPU to measure")
    args = parser.parse_args()
    request = http_request(args.url, args.body_file.read_bytes(), args.header_length, args.deadline)
    client = Client(args.url, request, args.expect.encode(), args.connections, args.deadline)
    pids = [int(p) for p in args.cpu_pids.split(",") if p]
    try:
        import uvloop

        result = uvloop.run(client.run(args.warmup, args.duration, pids))
    except ModuleNotFoundError:  # uvloop is uvicorn[standard]'s; plain asyncio works too
        result = asyncio.run(client.run(args.warmup, args.duration, pids))
    print("CLIENTJSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
