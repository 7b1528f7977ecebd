"""onnxruntime latency of one ONNX file: CPUExecutionProvider, one intra-op thread, the median of
a few timed runs after a warm-up, each measurement bounded in time so big 3-D nets stay affordable.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from foldserve.tensors import INPUT_NAME

LARGE_BATCH = 32
RUNS = 7  # timed runs per measurement, at most
MIN_RUNS = 3
MEASURE_SECONDS = 2.0  # stop adding runs past this (MIN_RUNS always run)
LARGE_RUN_SECONDS = 1.0  # the large batch is halved until one run fits in this


def session(model: bytes, optimized_to: Path | None = None) -> ort.InferenceSession:
    """A one-thread CPU session at ORT's default optimization level, as the server makes;
    ``optimized_to`` also saves the graph as ORT optimized it, to see which ops it fused."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
        options.log_severity_level = 3  # ORT warns that the saved graph is machine-specific
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def unfused_batch_norms(original: bytes, optimized: Path) -> int:
    """BatchNormalization ops ORT did not fold into a convolution: those left as they are, plus
    those its 2-D NCHWc layout pass turned into depthwise convolutions of their own."""
    before = Counter(node.op_type for node in onnx.load_model_from_string(original).graph.node)
    after = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    convolutions = ("Conv", "FusedConv", "ConvTranspose")
    added = sum(after[op] for op in convolutions) - sum(before[op] for op in convolutions)
    return after["BatchNormalization"] + max(0, added)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    runs: int


def time_runs(sess: ort.InferenceSession, batch: np.ndarray) -> Timing:
    sess.run(None, {INPUT_NAME: batch})  # warm-up: allocations, kernel selection
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < RUNS and (
        len(times) < MIN_RUNS or time.perf_counter() - started < MEASURE_SECONDS
    ):
        start = time.perf_counter()
        sess.run(None, {INPUT_NAME: batch})
        times.append(time.perf_counter() - start)
    return Timing(median_ms=1000 * statistics.median(times), runs=len(times))


def large_batch(single_ms: float) -> int:
    """LARGE_BATCH, halved until a run should take at most LARGE_RUN_SECONDS."""
    batch = LARGE_BATCH
    while batch > 1 and batch * single_ms / 1000 > LARGE_RUN_SECONDS:
        batch //= 2
    return batch


def outputs(sess: ort.InferenceSession, batch: np.ndarray) -> list[np.ndarray]:
    """Every output of the file, in its order."""
    return [np.asarray(result) for result in sess.run(None, {INPUT_NAME: batch})]
