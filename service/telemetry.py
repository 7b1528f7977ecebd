"""Every figure of every model version, in one store: counted on the request path with plain
arithmetic, read at scrape time by the Prometheus collector and by Triton's statistics.

Each version has a block of float64 slots (``LAYOUT``): requests by status code (and those over
gRPC by status code again), their durations,
Triton's success/fail counts and the four stage histograms (queue, compute_input, compute_infer,
compute_output), batch sizes and run times, refusals by reason, and three gauges (queue depth,
estimated wait, loaded). One process keeps its blocks in memory. With ``--workers`` each worker
keeps them in a file of its own, mapped into memory, under the supervisor's folder; whichever
worker is asked reads every worker's file and adds them up, so any worker answers for the whole
server at once, a crashed worker's counts included (its gauges are not: it holds nothing now).

NOTE: one writer per block (the process's event loop), no lock: an increment is a read and a
write of one slot, about 70 ns; a reader in another process may see a request's figures half
written for a moment, never a torn number.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# Request latencies: from tens of microseconds (one small batch) to the request timeout.
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Stage times, as Triton counts them: from a tenth of a millisecond.
STAGE_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
CODES = (200, 400, 401, 404, 405, 408, 413, 415, 431, 499, 500, 503, 504)  # others: "other"
SHED_REASONS = ("queue_full", "deadline", "connections", "body_memory")
COUNTS = (
    "success_count", "success_s", "fail_count", "fail_s", "inference_count", "execution_count",
    "last_inference_ms",
)  # fmt: skip
GAUGES = ("queue_depth", "estimated_wait_s", "loaded", "memory_bytes")


class Histogram:
    """Where one histogram lies in a block: its buckets (the last is +Inf), then its sum."""

    __slots__ = ("bounds", "end", "start", "sum_slot")

    def __init__(self, start: int, bounds: tuple[float, ...]) -> None:
        self.start = start
        self.bounds = bounds
        # Plain attributes, not properties: read on every request.
        self.sum_slot = start + len(bounds) + 1
        self.end = self.sum_slot + 1


class _Layout:
    def __init__(self) -> None:
        slot = 0
        self.codes = {code: slot + i for i, code in enumerate(CODES)}
        self.other_code = slot + len(CODES)
        slot = self.other_code + 1
        self.duration = Histogram(slot, SECONDS)
        slot = self.duration.end
        self.stages: dict[str, Histogram] = {}
        for stage in STAGES:
            self.stages[stage] = Histogram(slot, STAGE_SECONDS)
            slot = self.stages[stage].end
        self.batch_rows = Histogram(slot, ROWS)
        slot = self.batch_rows.end
        self.batch_seconds = Histogram(slot, SECONDS)
        slot = self.batch_seconds.end
        self.shed = {reason: slot + i for i, reason in enumerate(SHED_REASONS)}
        slot += len(SHED_REASONS)
        self.counts = {name: slot + i for i, name in enumerate(COUNTS)}
        slot += len(COUNTS)
        self.gauges = {name: slot + i for i, name in enumerate(GAUGES)}
        slot += len(GAUGES)
        # The requests that came over gRPC, by status, again: a subset of ``codes``.
        self.grpc_codes = {code: slot + i for i, code in enumerate(CODES)}
        self.grpc_other = slot + len(CODES)
        self.size = self.grpc_other + 1


LAYOUT = _Layout()
_L = LAYOUT
_BLOCK_BYTES = 8 * LAYOUT.size
_CAPACITY = 1024  # versions one worker's file holds (a sparse file: untouched blocks cost nothing)
_SUCCESS, _SUCCESS_S = _L.counts["success_count"], _L.counts["success_s"]
_FAIL, _FAIL_S = _L.counts["fail_count"], _L.counts["fail_s"]
_ROWS_DONE, _RUNS = _L.counts["inference_count"], _L.counts["execution_count"]
_LAST = _L.counts["last_inference_ms"]
_QUEUE, _WAIT, _LOADED, _MEMORY = (_L.gauges[g] for g in GAUGES)
_INPUT, _OUTPUT = _L.stages["compute_input"], _L.stages["compute_output"]
_QUEUE_STAGE, _INFER = _L.stages["queue"], _L.stages["compute_infer"]
_GRPC_200 = _L.grpc_codes[200]


class Figures:
    """One version's block in this process. Every method is a few slot updates."""

    __slots__ = ("_v",)

    def __init__(self, slots: memoryview[float]) -> None:
        self._v = slots

    def rebind(self, slots: memoryview[float]) -> None:
        """The block moved (the store grew, or went into a shared file)."""
        self._v = slots

    def _observe(self, h: Histogram, value: float, weight: int = 1) -> None:
        v = self._v
        v[h.start + bisect_left(h.bounds, value)] += weight
        v[h.sum_slot] += value * weight

    # -- the request path (service.dataplane), once per request

    def answered(
        self, rows: int, total_s: float, input_s: float, output_s: float, grpc: bool = False
    ) -> None:
        v = self._v
        v[_L.codes[200]] += 1
        if grpc:
            v[_GRPC_200] += 1
        self._observe(_L.duration, total_s)
        v[_SUCCESS] += 1
        v[_SUCCESS_S] += total_s
        v[_ROWS_DONE] += rows
        self._observe(_INPUT, input_s)
        self._observe(_OUTPUT, output_s)

    def refused(
        self, status: int, total_s: float, shed: str | None = None, grpc: bool = False
    ) -> None:
        v = self._v
        v[_L.codes.get(status, _L.other_code)] += 1
        if grpc:
            v[_L.grpc_codes.get(status, _L.grpc_other)] += 1
        self._observe(_L.duration, total_s)
        v[_FAIL] += 1
        v[_FAIL_S] += total_s
        if shed is not None:
            v[_L.shed.get(shed, _L.shed["queue_full"])] += 1

    # -- the batcher (service.batching.BatchStats)

    def waited(self, seconds: float) -> None:
        self._observe(_QUEUE_STAGE, seconds)

    def ran(self, requests: int, rows: int, seconds: float) -> None:
        """One backend run that computed (parts of) ``requests`` requests: its time counts once
        per request in ``compute_infer``, as in Triton."""
        v = self._v
        v[_RUNS] += 1
        v[_LAST] = time.time_ns() // 1_000_000
        self._observe(_INFER, seconds, requests)
        self._observe(_L.batch_rows, rows)
        self._observe(_L.batch_seconds, seconds)

    def gauge(self, queue_rows: int, estimated_wait_s: float) -> None:
        self._v[_QUEUE] = queue_rows
        self._v[_WAIT] = estimated_wait_s

    def loaded(self, loaded: bool) -> None:
        self._v[_LOADED] = 1.0 if loaded else 0.0

    def memory(self, held_bytes: int) -> None:
        self._v[_MEMORY] = held_bytes


Key = tuple[str, str]  # (model, version) as labels: ("", "") for requests that resolved to none
UNRESOLVED: Key = ("", "")


@dataclass
class Reading:
    """One version's figures, summed over the processes that count (``pooled``), and its gauges
    over the live ones."""

    slots: list[float]
    live_workers: int  # processes alive that hold this version (1 without --workers)

    def get(self, slot: int) -> float:
        return self.slots[slot]

    def histogram(self, h: Histogram) -> tuple[list[tuple[str, float]], float]:
        """Prometheus's cumulative buckets and the sum."""
        bounds = [*(floatToGoString(float(b)) for b in h.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        running, buckets = 0.0, []
        for bound, n in zip(bounds, self.slots[h.start : h.sum_slot], strict=True):
            running += n
            buckets.append((bound, running))
        return buckets, self.slots[h.sum_slot]

    def count(self, h: Histogram) -> float:
        return sum(self.slots[h.start : h.sum_slot])


class Telemetry:
    """This process's blocks; with ``pooled_dir`` (``--workers``), in a file others can read."""

    def __init__(self, pooled_dir: Path | None = None) -> None:
        self._pooled_dir = pooled_dir
        self._name = ""  # the file's name once shared
        self._keys: list[Key] = []
        self._index: dict[Key, Figures] = {}
        self._buffer: bytearray | mmap.mmap = bytearray(_BLOCK_BYTES * 16)
        self._slots: memoryview[float] = memoryview(self._buffer).cast("d")
        self.unresolved = self.version(*UNRESOLVED)

    @property
    def shared(self) -> bool:
        return bool(self._name)

    def share(self) -> None:
        """With --workers (``pooled_dir``), move the blocks into this worker's file, where the
        other workers read them; called when the server starts (nothing is written before)."""
        if self._pooled_dir is None or self.shared:
            return
        # NOTE: named by pid and start time: a worker that gets a dead one's pid must not
        # overwrite its counts.
        self._name = f"worker-{os.getpid()}-{time.time_ns()}"
        path = self._pooled_dir / f"{self._name}.bin"
        with path.open("w+b") as file:
            file.truncate(_BLOCK_BYTES * _CAPACITY)
            mapped = mmap.mmap(file.fileno(), _BLOCK_BYTES * _CAPACITY)
        used = len(self._keys) * _BLOCK_BYTES
        mapped[:used] = bytes(self._buffer[:used])
        self._move_to(mapped)
        self._write_keys()

    def version(self, model: str, version: int | str) -> Figures:
        """The block of ``model`` ``version``, made on first use (at load, not per request)."""
        key = (model, str(version))
        figures = self._index.get(key)
        if figures is not None:
            return figures
        if len(self._keys) * _BLOCK_BYTES >= len(self._buffer):
            if self.shared:
                raise RuntimeError(f"more than {_CAPACITY} model versions in one process")
            grown = bytearray(len(self._buffer) * 2)
            grown[: len(self._buffer)] = self._buffer
            self._move_to(grown)
        start = len(self._keys) * LAYOUT.size
        self._keys.append(key)
        figures = self._index[key] = Figures(self._slots[start : start + LAYOUT.size])
        if self.shared:
            self._write_keys()
        return figures

    def _move_to(self, buffer: bytearray | mmap.mmap) -> None:
        """Every block now lives in ``buffer`` (which holds their figures already)."""
        self._buffer = buffer
        self._slots = memoryview(buffer).cast("d")
        for i, key in enumerate(self._keys):
            self._index[key].rebind(self._slots[i * LAYOUT.size : (i + 1) * LAYOUT.size])

    def _write_keys(self) -> None:
        assert self._pooled_dir is not None
        path = self._pooled_dir / f"{self._name}.json"
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps({"keys": self._keys}))
        staged.replace(path)  # readers see the old list or the new one, never half of one

    # -- reading (scrape time)

    def read(self) -> dict[Key, Reading]:
        """Every version's figures: this process's, or with --workers every worker's summed."""
        if self._pooled_dir is None or not self.shared:
            return {
                key: Reading(list(self._slots[i * LAYOUT.size : (i + 1) * LAYOUT.size]), 1)
                for i, key in enumerate(self._keys)
            }
        return _read_pooled(self._pooled_dir)

    def processes(self) -> tuple[int, int]:
        """Worker processes (started in this server's life, alive now): one of each without
        --workers; with them, every worker's file counts once (a restarted worker is a new
        process with a new file) and the supervisor's restarts show as started > alive."""
        if self._pooled_dir is None or not self.shared:
            return 1, 1
        pids = [f.stem.split("-")[1] for f in self._pooled_dir.glob("worker-*.json")]
        return len(pids), sum(1 for pid in pids if pid.isdigit() and pid_alive(int(pid)))


def _read_pooled(folder: Path) -> dict[Key, Reading]:
    blocks: dict[Key, list[tuple[list[float], bool]]] = {}
    for keys_file in folder.glob("worker-*.json"):
        pid = keys_file.stem.split("-")[1]
        try:
            keys = [tuple(k) for k in json.loads(keys_file.read_text())["keys"]]
            data = keys_file.with_suffix(".bin").read_bytes()[: len(keys) * _BLOCK_BYTES]
        except (OSError, ValueError, KeyError):
            continue  # a worker starting or gone: the next scrape will tell
        slots = memoryview(data).cast("d")
        alive = pid.isdigit() and pid_alive(int(pid))
        for i, key in enumerate(keys):
            block = list(slots[i * LAYOUT.size : (i + 1) * LAYOUT.size])
            blocks.setdefault((str(key[0]), str(key[1])), []).append((block, alive))
    readings = {}
    for key, found in blocks.items():
        total = [sum(column) for column in zip(*(block for block, _ in found), strict=True)]
        # A dead worker's counts stay in the totals; its gauges say nothing now.
        live = [block for block, alive in found if alive]
        total[_QUEUE] = sum(block[_QUEUE] for block in live)
        total[_MEMORY] = sum(block[_MEMORY] for block in live)  # each worker holds its own
        total[_WAIT] = max((block[_WAIT] for block in live), default=0.0)
        # Loaded only when every live worker has it loaded, as before.
        total[_LOADED] = min((block[_LOADED] for block in live), default=0.0)
        readings[key] = Reading(total, len(live))
    return readings


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True
