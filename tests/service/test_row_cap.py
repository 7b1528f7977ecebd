"""The row cap a version is served with (service.batching_policy.row_cap): a slow model whose
batches buy no speed on this machine runs one row at a time, so its memory is one row's."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.backends import Array
from service.batching_policy import row_cap
from service.settings import BatchingOverride, Settings
from service.store import read_manifest
from tests.service.conftest import SHIPPED_STORE, serve

MANIFEST = read_manifest(SHIPPED_STORE / "digits-cnn" / "1")


class Timed:
    """A stand-in session: each run takes ``fixed`` seconds plus ``per_row`` for each row."""

    format, device = "onnx", "cpu"

    def __init__(self, fixed: float, per_row: float) -> None:
        self.fixed, self.per_row = fixed, per_row
        self.runs: list[int] = []

    def run(self, x: Array) -> Array:
        self.runs.append(len(x))
        time.sleep(self.fixed + self.per_row * len(x))
        return np.zeros((len(x), 10), np.float32)

    def batch_statistics_ops(self) -> list[str]:
        return []


def cap(settings: Settings, probe: Timed, one_row_ms: float = 5.0, planned: int = 27) -> int:
    return row_cap(settings, "digits-cnn", planned, one_row_ms, lambda: probe, MANIFEST).rows


def test_a_slow_model_whose_batches_buy_nothing_runs_one_row_at_a_time() -> None:
    probe = Timed(fixed=0.0, per_row=0.004)  # rows per second the same at any batch size
    chosen = row_cap(Settings(), "digits-cnn", 27, 5.0, lambda: probe, MANIFEST)
    assert chosen.rows == 1 and "the manifest allows 27" in chosen.why
    assert re.search(r"a batch of 8 rows ran (0\.9\d|1\.0\d)x the rows per second", chosen.why)
    assert set(probe.runs) == {1, 8}  # one row, and a batch of 8, each warmed then timed


def test_a_slow_model_whose_batches_pay_keeps_the_manifests_cap() -> None:
    assert cap(Settings(), Timed(fixed=0.008, per_row=0.0005)) == 27  # 8 rows: 4.8x one's


@pytest.mark.parametrize(
    "settings",
    [
        Settings(max_batch_size=27),
        Settings(model_batching={"digits-cnn": BatchingOverride(max_batch_size=27)}),
        Settings(measure_batching=False),
    ],
    ids=["max_batch_size", "model_batching", "measure_batching off"],
)
def test_a_cap_set_by_the_operator_or_measuring_off_is_kept(settings: Settings) -> None:
    probe = Timed(fixed=0.0, per_row=0.004)
    assert cap(settings, probe) == 27 and probe.runs == []


def test_a_fast_model_is_not_timed() -> None:
    probe = Timed(fixed=0.0, per_row=0.004)
    assert cap(Settings(), probe, one_row_ms=0.05) == 27 and probe.runs == []


def test_each_version_says_what_memory_it_holds(tmp_path: Path) -> None:
    settings = Settings(model_store=SHIPPED_STORE, default_model="digits-mlp")
    with serve(create_app(settings)) as base:
        models = httpx.get(f"{base}/models").json()["models"]
        metrics = httpx.get(f"{base}/metrics").text
    (family,) = [
        f
        for f in text_string_to_metric_families(metrics)
        if f.name == "foldserve_model_memory_bytes"
    ]
    exported = {s.labels["model"]: s.value for s in family.samples}
    for model in models:
        (version,) = model["versions"]
        held = version["memory_bytes"]
        assert isinstance(held, int) and held >= 0
        assert exported[model["name"]] == held
