"""How onnxruntime best uses this machine's cores for one model, in-process, no server.

Images per second of one model file in each way a server could run it: one session with every
core as intra-op threads, at batch 1, 2 and 4; one session with one thread; two one-thread runs
side by side (two sessions, and one session called from two threads); and two callers sharing one
session with every thread. The figures behind parallel runs (service/parallel_runs.py).

    .venv-bench/bin/python bench/session_modes.py bench/.cache/real-models-*/unet2d/1/model.onnx
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")  # as foldserve
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def rate(runs: list[Callable[[], int]], seconds: float) -> float:
    """Images per second with each of ``runs`` called in a loop in its own thread at once."""
    for run in runs:
        run()  # warm-up: a shape's first run allocates
    done = [0] * len(runs)
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            done[i] += runs[i]()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(runs))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    wide, narrow, other = session(args.model, cores), session(args.model, 1), session(args.model, 1)
    spec = wide.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    x = np.random.default_rng(0).standard_normal((4, *shape), dtype=np.float32)

    def runner(s: ort.InferenceSession, rows: int) -> Callable[[], int]:
        def run() -> int:
            s.run(None, {spec.name: x[:rows]})
            return rows

        return run

    modes = [
        (f"one session, {cores} threads, batch 1", [runner(wide, 1)]),
        (f"one session, {cores} threads, batch 2", [runner(wide, 2)]),
        (f"one session, {cores} threads, batch 4", [runner(wide, 4)]),
        ("one session, 1 thread, batch 1", [runner(narrow, 1)]),
        ("two 1-thread sessions side by side", [runner(narrow, 1), runner(other, 1)]),
        ("one 1-thread session, two callers", [runner(narrow, 1), runner(narrow, 1)]),
        (f"one {cores}-thread session, two callers", [runner(wide, 1), runner(wide, 1)]),
    ]
    print(f"{args.model} ({'x'.join(map(str, shape))}), {cores} cores, {args.seconds:g} s each")
    print("| mode | images/s |\n|---|--:|")
    for label, runs in modes:
        print(f"| {label} | {rate(runs, args.seconds):.1f} |", flush=True)


if __name__ == "__main__":
    main()
