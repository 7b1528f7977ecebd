"""The drift monitor on its own: real digits against the shipped models' frozen statistics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from foldserve.demos.data import load_dataset
from service.drift import (
    DEFAULT_THRESHOLD,
    FOLD_EVERY_S,
    MAX_FOLD_ROWS,
    MAX_PENDING_BYTES,
    MIN_SAMPLES,
    NO_INPUT_BN,
    DriftMonitor,
)
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
    report = monitor.report()
    assert report.available and report.layer == "input_norm" and report.axis == "feature"
    assert report.samples == pytest.approx(in_window(monitor, len(held_out)))
    assert report.score is not None and report.score < DEFAULT_THRESHOLD / 3
    assert not report.drifted
    # Any MIN_SAMPLES of them too: sampling noise alone stays under the threshold.
    rng = np.random.default_rng(0)
    for _ in range(20):
        small = DriftMonitor.for_manifest(mlp)
        small.observe(held_out[rng.choice(len(held_out), MIN_SAMPLES, replace=False)])
        assert not small.report().drifted


@pytest.mark.parametrize(
    "change",
    [shifted, lambda x: 16.0 - x, lambda x: np.roll(x.reshape(-1, 8, 8), 1, axis=2)],
    ids=["x1.5+1", "inverted", "moved-1px"],
)
def test_shifted_digits_cross_the_threshold(mlp: Manifest, held_out: np.ndarray, change) -> None:  # type: ignore[no-untyped-def]
    monitor = DriftMonitor.for_manifest(mlp)
    feed(monitor, np.ascontiguousarray(change(held_out), dtype=np.float32).reshape(-1, 64))
    report = monitor.report()
    assert report.score is not None and report.score > 2 * DEFAULT_THRESHOLD
    assert report.drifted
    worst = max(report.features, key=lambda f: abs(f.mean_shift or 0.0))
    assert worst.live_mean is not None and abs(worst.live_mean - worst.ref_mean) > 1.0


def test_no_verdict_before_min_samples(mlp: Manifest, held_out: np.ndarray) -> None:
    monitor = DriftMonitor.for_manifest(mlp)
    assert monitor.report().score is None and not monitor.report().drifted
    monitor.observe(shifted(held_out[: MIN_SAMPLES - 1]))
    report = monitor.report()
    assert report.score is not None and report.score > DEFAULT_THRESHOLD
    assert not report.drifted  # too few samples to say
    monitor.observe(shifted(held_out[MIN_SAMPLES - 1 : MIN_SAMPLES + 10]))
    assert monitor.report().drifted


def test_the_window_forgets(mlp: Manifest, held_out: np.ndarray) -> None:
    monitor = DriftMonitor(mlp.input_statistics, window=200, max_fold_rows=None)
    feed(monitor, shifted(held_out))
    assert monitor.report().drifted
    feed(monitor, np.concatenate([held_out, held_out]))  # the shifted data now weighs e^-4.5
    report = monitor.report()
    assert not report.drifted and report.score is not None
    assert report.score < DEFAULT_THRESHOLD
    assert report.samples == pytest.approx(in_window(monitor, 3 * len(held_out)))


def test_memory_is_bounded_whatever_the_traffic(mlp: Manifest, held_out: np.ndarray) -> None:
    monitor = DriftMonitor(mlp.input_statistics, max_fold_rows=None)  # folds when pending is full
    for _ in range(100):
        monitor.observe(np.repeat(held_out, 10, axis=0))  # 4500 rows, 1.1 MiB a request
        assert monitor._pending_bytes <= MAX_PENDING_BYTES
    assert monitor.report().samples == pytest.approx(monitor.window, rel=1e-6)


def test_the_sums_are_folded_later_on_the_loop(mlp: Manifest, held_out: np.ndarray) -> None:
    async def scenario() -> tuple[tuple[float | None, float], tuple[float | None, float]]:
        monitor = DriftMonitor.for_manifest(mlp)
        feed(monitor, held_out)
        before = monitor.latest  # observe only queued the rows
        await asyncio.sleep(FOLD_EVERY_S * 3)
        return before, monitor.latest

    before, after = asyncio.run(scenario())
    assert before == (None, 0.0)
    assert after[0] is not None and after[1] == pytest.approx(
        in_window(DriftMonitor(None), len(held_out))
    )


def test_the_score_is_what_the_docstring_says() -> None:
    reference = InputStatistics(
        layer="bn", axis="feature", source="ema", mean=(0.0, 10.0), var=(1.0, 4.0), eps=0.0
    )
    monitor = DriftMonitor(reference, window=10**9, max_fold_rows=None)  # no decay to speak of
    rng = np.random.default_rng(0)
    rows = np.stack([rng.normal(0.5, 1.0, 4000), rng.normal(10.0, 4.0, 4000)], axis=1)
    monitor.observe(rows.astype(np.float32))
    report = monitor.report()
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
    assert calm.report().axis == "channel" and len(calm.report().features) == 1
    assert not calm.report().drifted and moved.report().drifted


def test_a_model_without_an_input_bn_says_so() -> None:
    monitor = DriftMonitor(None)
    monitor.observe(np.ones((3, 4), dtype=np.float32))
    report = monitor.report()
    assert not report.available and report.reason == NO_INPUT_BN
    assert report.score is None and not report.drifted and report.features == []


def test_a_monitoring_failure_never_reaches_the_request(
    mlp: Manifest, held_out: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = DriftMonitor(mlp.input_statistics, max_fold_rows=None)
    monitor.observe(held_out[:5])
    monitor.observe(np.ones((2, 63), dtype=np.float32))  # cannot happen after validation
    # Past MAX_PENDING_BYTES the fold runs inline, inside observe: it must not raise there.
    monitor.observe(np.full((MAX_PENDING_BYTES // 256 + 1, 64), 7.0, dtype=np.float32))
    assert "drift monitoring failed" in caplog.text
    assert monitor.latest == (None, 0.0) and monitor._pending == []  # reset, not stuck
    monitor.observe(held_out)
    assert monitor.report().samples == pytest.approx(in_window(monitor, len(held_out)))


def test_heavy_traffic_is_sampled_newest_rows_first(mlp: Manifest, held_out: np.ndarray) -> None:
    monitor = DriftMonitor.for_manifest(mlp)
    monitor.observe(shifted(held_out))  # older: left out of this fold
    monitor.observe(np.repeat(held_out, 2, axis=0)[:MAX_FOLD_ROWS])
    report = monitor.report()
    assert report.samples == pytest.approx(in_window(monitor, MAX_FOLD_ROWS))
    assert not report.drifted  # only the newest (in-distribution) rows were folded
