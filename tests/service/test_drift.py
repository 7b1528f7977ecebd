"""The drift monitor on its own: real digits against the shipped models' frozen statistics,
folded in the background thread (tests wait for it with ``flush``)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest

from foldserve.demos.data import load_dataset
from service.drift import (
    DEFAULT_THRESHOLD,
    FOLD_EVERY_S,
    MAX_PENDING_BYTES,
    MIN_SAMPLES,
    NO_INPUT_BN,
    DriftMonitor,
)
from service.drift_budget import BURST_S, CpuBudget
from service.drift_layer import MonitoredLayer
from service.drift_report import DriftReport
from service.drift_thread import FoldThread
from service.store import InputStatistics, Manifest, read_manifest

SHIPPED = Path(__file__).resolve().parents[2] / "model_store"


@pytest.fixture(scope="module")
def mlp() -> Manifest:
    return read_manifest(SHIPPED / "digits-mlp" / "1")


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    """The 450 digits the shipped models never trained on: the same distribution as training."""
    return load_dataset("digits", (64,)).x_test.astype(np.float32)


def feed(monitor: DriftMonitor, rows: np.ndarray, per_request: int = 7) -> None:
    for start in range(0, len(rows), per_request):
        monitor.observe(rows[start : start + per_request])


def folded(monitor: DriftMonitor) -> DriftReport:
    """The report once everything observed so far is folded."""
    assert monitor.flush()
    return monitor.report()


def in_window(monitor: DriftMonitor, rows: int) -> float:
    """The decayed count of ``rows`` samples: sum of (1 - 1/window)^k for k < rows."""
    decay = 1.0 - 1.0 / monitor.window
    return (1.0 - decay**rows) / (1.0 - decay)


def shifted(x: np.ndarray) -> np.ndarray:
    """Another scanner: brighter and with a black level of 1."""
    return (x * 1.5 + 1.0).astype(np.float32)


def test_held_out_digits_stay_below_the_threshold(mlp: Manifest, held_out: np.ndarray) -> None:
    monitor = DriftMonitor.for_manifest(mlp)
    feed(monitor, held_out)
    report = folded(monitor)
    assert report.available and report.layer == "input_norm" and report.axis == "feature"
    assert report.samples == pytest.approx(in_window(monitor, len(held_out)))
    assert report.samples_observed == report.samples_folded == len(held_out)  # cheap: every row
    assert report.score is not None and report.score < DEFAULT_THRESHOLD / 3
    assert not report.drifted
    # Any MIN_SAMPLES of them too: sampling noise alone stays under the threshold.
    rng = np.random.default_rng(0)
    for _ in range(20):
        small = DriftMonitor.for_manifest(mlp)
        small.observe(held_out[rng.choice(len(held_out), MIN_SAMPLES, replace=False)])
        assert not folded(small).drifted


@pytest.mark.parametrize(
    "change",
    [shifted, lambda x: 16.0 - x, lambda x: np.roll(x.reshape(-1, 8, 8), 1, axis=2)],
    ids=["x1.5+1", "inverted", "moved-1px"],
)
def test_shifted_digits_cross_the_threshold(mlp: Manifest, held_out: np.ndarray, change) -> None:  # type: ignore[no-untyped-def]
    monitor = DriftMonitor.for_manifest(mlp)
    feed(monitor, np.ascontiguousarray(change(held_out), dtype=np.float32).reshape(-1, 64))
    report = folded(monitor)
    assert report.score is not None and report.score > 2 * DEFAULT_THRESHOLD
    assert report.drifted
    worst = max(report.features, key=lambda f: abs(f.mean_shift or 0.0))
    assert worst.live_mean is not None and abs(worst.live_mean - worst.ref_mean) > 1.0


def test_no_verdict_before_min_samples(mlp: Manifest, held_out: np.ndarray) -> None:
    monitor = DriftMonitor.for_manifest(mlp)
    assert monitor.report().score is None and not monitor.report().drifted
    monitor.observe(shifted(held_out[: MIN_SAMPLES - 1]))
    report = folded(monitor)
    assert report.score is not None and report.score > DEFAULT_THRESHOLD
    assert not report.drifted  # too few samples to say
    monitor.observe(shifted(held_out[MIN_SAMPLES - 1 : MIN_SAMPLES + 10]))
    assert folded(monitor).drifted


def test_the_window_forgets(mlp: Manifest, held_out: np.ndarray) -> None:
    monitor = DriftMonitor(mlp.input_statistics, window=200, budget=None)
    feed(monitor, shifted(held_out))
    assert folded(monitor).drifted
    feed(monitor, np.concatenate([held_out, held_out]))  # the shifted data now weighs e^-4.5
    report = folded(monitor)
    assert not report.drifted and report.score is not None
    assert report.score < DEFAULT_THRESHOLD
    assert report.samples == pytest.approx(in_window(monitor, 3 * len(held_out)))


def test_memory_is_bounded_whatever_the_traffic(mlp: Manifest, held_out: np.ndarray) -> None:
    thread, release = FoldThread(), threading.Event()
    thread.submit(lambda: release.wait(30))  # the fold thread is busy: nothing is folded
    monitor = DriftMonitor(mlp.input_statistics, budget=None, thread=thread)
    big = np.repeat(held_out, 10, axis=0)  # 4500 rows, 1.1 MiB a request
    for _ in range(100):
        monitor.observe(big)  # never blocks, never raises
        assert monitor._pending.bytes <= MAX_PENDING_BYTES
    release.set()
    report = folded(monitor)
    kept = MAX_PENDING_BYTES // big[0].nbytes  # the rows the buffer holds between folds
    assert report.samples_observed == 100 * len(big)
    assert report.samples_folded == kept
    assert report.samples == pytest.approx(in_window(monitor, kept))


def test_folds_run_in_the_fold_thread_never_on_the_loop(
    mlp: Manifest, held_out: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[int] = set()
    fold = MonitoredLayer.fold

    def recorded(layer: MonitoredLayer, rows: object) -> float:
        threads.add(threading.get_ident())
        return fold(layer, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(MonitoredLayer, "fold", recorded)

    async def scenario() -> tuple[int, tuple[float | None, float], tuple[float | None, float]]:
        monitor = DriftMonitor.for_manifest(mlp)
        feed(monitor, held_out)  # on the loop, as DataPlane.serve does
        before = monitor.latest  # observe only queued the rows
        for _ in range(100):  # the fold thread folds them FOLD_EVERY_S later
            await asyncio.sleep(FOLD_EVERY_S)
            if monitor.latest[1] > 0:
                break
        return threading.get_ident(), before, monitor.latest

    loop_thread, before, after = asyncio.run(scenario())
    assert before == (None, 0.0)
    assert after[0] is not None and after[1] == pytest.approx(
        in_window(DriftMonitor(None), len(held_out))
    )
    assert threads and loop_thread not in threads and threading.get_ident() not in threads


def test_the_score_is_what_the_docstring_says() -> None:
    reference = InputStatistics(
        layer="bn", axis="feature", source="ema", mean=(0.0, 10.0), var=(1.0, 4.0), eps=0.0
    )
    monitor = DriftMonitor(reference, window=10**9, budget=None)  # no decay to speak of
    rng = np.random.default_rng(0)
    rows = np.stack([rng.normal(0.5, 1.0, 4000), rng.normal(10.0, 4.0, 4000)], axis=1)
    monitor.observe(rows.astype(np.float32))
    report = folded(monitor)
    floor = 0.01 * (1.0 + 4.0) / 2
    live_mean, live_var = rows.mean(0), rows.var(0)
    shift = np.abs(live_mean - [0.0, 10.0]) / np.sqrt(np.array([1.0, 4.0]) + floor)
    ratio = np.abs(np.log((live_var + floor) / (np.array([1.0, 4.0]) + floor)))
    assert report.score == pytest.approx(shift.mean() + ratio.mean(), rel=1e-4)
    assert [f.live_mean for f in report.features] == pytest.approx(live_mean, rel=1e-4)
    assert [f.live_var for f in report.features] == pytest.approx(live_var, rel=1e-3)


def test_images_are_compared_per_channel(held_out: np.ndarray) -> None:
    cnn = read_manifest(SHIPPED / "digits-cnn" / "1")
    images = held_out.reshape(-1, 1, 8, 8)
    calm, moved = DriftMonitor.for_manifest(cnn), DriftMonitor.for_manifest(cnn)
    feed(calm, images)
    feed(moved, shifted(images))
    assert folded(calm).axis == "channel" and len(calm.report().features) == 1
    assert not calm.report().drifted and folded(moved).drifted


def test_a_model_without_an_input_bn_says_so() -> None:
    monitor = DriftMonitor(None)
    monitor.observe(np.ones((3, 4), dtype=np.float32))
    report = folded(monitor)
    assert not report.available and report.reason == NO_INPUT_BN
    assert report.score is None and not report.drifted and report.features == []


def test_a_monitoring_failure_never_reaches_the_request(
    mlp: Manifest, held_out: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = DriftMonitor(mlp.input_statistics, budget=None)
    monitor.observe(held_out[:0])  # no rows: nothing to fold, nothing wrong
    assert folded(monitor).resets == 0
    monitor.observe(held_out[:5])
    layer = monitor._layers[0]

    def broken(rows: object) -> float:
        raise ValueError("a bug in the arithmetic")

    layer.fold = broken  # type: ignore[method-assign]
    report = folded(monitor)  # it failed in the fold thread, which goes on
    del layer.fold
    assert "drift monitoring failed for a model: the statistics of input_norm" in caplog.text
    assert report.resets == 1 and report.last_reset is not None
    assert report.last_reset.layer == "input_norm" and report.last_reset.reason == "ValueError"
    assert report.score is None and report.samples == 0.0  # reset, not stuck
    monitor.observe(held_out)
    assert folded(monitor).samples == pytest.approx(in_window(monitor, len(held_out)))


def test_no_finite_input_poisons_the_monitor(
    mlp: Manifest, held_out: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 17: one row of 1e30 overflowed the sums, and the score stayed null until a restart."""
    monitor = DriftMonitor(mlp.input_statistics, window=200, budget=None)
    feed(monitor, held_out)
    calm = folded(monitor)
    assert calm.score is not None and not calm.drifted
    for huge in (1e30, 3e38):  # 3e38: next to float32's largest
        monitor.observe(np.full((1, 64), huge, dtype=np.float32))
        report = folded(monitor)
        assert report.score is not None and report.score > 10 * DEFAULT_THRESHOLD
        assert report.drifted  # the most drifted input there is reads as drifted
        assert all(np.isfinite([f.live_mean, f.live_var]).all() for f in report.features)
    scores = []
    for _ in range(8):  # then normal rows: 8 windows of them
        feed(monitor, np.concatenate([held_out] * 4)[:400])
        scores.append(folded(monitor).score)
    assert all(b is not None and a is not None and b < a for a, b in itertools.pairwise(scores))
    assert scores[-1] is not None and scores[-1] < DEFAULT_THRESHOLD
    assert not monitor.report().drifted and monitor.report().resets == 0  # never reset: finite
    assert "drift monitoring failed" not in caplog.text


def test_a_layer_samples_within_its_cpu_budget(mlp: Manifest, held_out: np.ndarray) -> None:
    monitor = DriftMonitor(mlp.input_statistics, budget=1e-6)  # a microsecond a second
    for _ in range(3):
        monitor.observe(held_out)
    report = folded(monitor)
    # The first row is taken to measure its cost, which the credit cannot pay for again soon.
    assert report.samples_observed == 3 * len(held_out)
    assert report.samples_folded == 1 and report.samples == 1.0


@pytest.mark.parametrize(
    "row_cost", [1e-6, 2e-3, 0.05]
)  # digits; a stem image; dearer than a burst
def test_a_budget_spends_its_share_whatever_a_row_costs(row_cost: float) -> None:
    share, seconds, fold_every = 0.01, 120.0, 0.05
    budget, spent, taken = CpuBudget(share, clock=0.0), 0.0, 0
    for step in range(int(seconds / fold_every)):
        rows = budget.rows(10_000, now=step * fold_every)  # heavy traffic: 10,000 rows a fold
        budget.charge(rows * row_cost, rows)
        spent, taken = spent + rows * row_cost, taken + rows
    assert spent <= share * (seconds + BURST_S) + row_cost  # the share, the burst, one row
    assert spent >= share * seconds * 0.9  # and it does spend it: as many rows as it pays for
    assert budget.seconds_per_row == pytest.approx(row_cost)


def _cpu_seconds_by_thread() -> dict[str, float]:
    """CPU time of every thread of this process (Linux: /proc/self/task/*/schedstat, in ns)."""
    seconds = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            seconds[task.name] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return seconds


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_no_thread_spins_while_requests_flow(mlp: Manifest, held_out: np.ndarray) -> None:
    """Issue 17: folds every 50 ms kept numpy's OpenBLAS threads spinning, a core burnt. Now the
    fold thread pins numpy's BLAS to one thread, and nothing but the folds (within their budget)
    runs besides the loop."""
    from threadpoolctl import threadpool_info

    directory = SHIPPED / "digits-mlp" / "1"
    monitor = DriftMonitor.for_manifest(read_manifest(directory), directory=directory)
    requests = np.concatenate([held_out] * 2)[:512].reshape(8, 64, 64)

    async def traffic(seconds: float) -> tuple[float, dict[str, float], dict[str, float]]:
        before, started = _cpu_seconds_by_thread(), asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - started < seconds:
            for request in requests:
                monitor.observe(request)
                await asyncio.sleep(0.005)
        return asyncio.get_running_loop().time() - started, before, _cpu_seconds_by_thread()

    wall, before, after = asyncio.run(traffic(1.5))
    assert monitor.flush()
    main = str(threading.get_native_id())  # the loop's thread: observe and asyncio
    others = {task: after[task] - before.get(task, 0.0) for task in after if task != main}
    assert max(others.values()) < 0.1 * wall, others  # spinning would read about 1.0 * wall
    # numpy's own (a wheel's numpy.libs/); scipy's, loaded here by the test data, is not ours
    ours = [info for info in threadpool_info() if "numpy" in Path(info["filepath"]).parent.name]
    assert ours and all(info["num_threads"] == 1 for info in ours), ours
