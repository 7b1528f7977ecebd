"""The ONNX backend never serves on the CPU when the GPU was asked for."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from service.backends import BackendOptions
from service.backends import onnx as onnx_backend
from service.backends.onnx import choose_providers
from service.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "model_store" / "digits-mlp" / "1" / "model.onnx"


def test_a_silent_fall_back_from_cuda_to_the_cpu_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As with onnxruntime-gpu on a machine whose driver is missing: CUDA is listed, but the
    # session cannot use it and runs on the CPU.
    real = onnx_backend.ort.get_available_providers()
    monkeypatch.setattr(
        onnx_backend.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime's own warning about the missing provider
        with pytest.raises(ConfigError, match=r"fell back to .*CPUExecutionProvider"):
            onnx_backend.OnnxBackend(SHIPPED, BackendOptions(device="cuda"))
        auto = onnx_backend.OnnxBackend(SHIPPED, BackendOptions(device="auto"))
    assert auto.device == "cpu"  # asked for nothing in particular: the CPU is fine


def test_the_thread_pool_stops_spinning_when_a_run_returns() -> None:
    # Spinning between runs took a core from the event loop (docs/performance.md): the session
    # must carry the setting, whatever the thread count.
    backend = onnx_backend.OnnxBackend(SHIPPED, BackendOptions(intra_op_threads=2))
    options = backend._session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.intra_op_num_threads == 2


def test_a_machine_without_cuda_is_said_once_not_per_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    onnx_backend._say_cpu_only.cache_clear()
    caplog.set_level(logging.WARNING)
    for _ in range(3):  # every version, and each check of it, opens a session
        assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    said = [r for r in caplog.records if "no CUDA execution provider" in r.getMessage()]
    assert len(said) == 1
    assert choose_providers("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert len([r for r in caplog.records if "no CUDA" in r.getMessage()]) == 1
