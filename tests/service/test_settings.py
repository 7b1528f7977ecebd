"""Settings from the environment: JSON for per-model values, and typos that are reported."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.app import create_app
from service.settings import (
    BatchingOverride,
    Settings,
    env_names,
    to_environ,
    unknown_env_message,
    unknown_env_names,
)


def test_unknown_foldserve_names_are_listed_and_known_ones_are_not() -> None:
    environ = {
        "FOLDSERVE_MAX_BATCHSIZE": "32",  # the typo this exists for
        "FOLDSERVE_PORT": "9000",
        "foldserve_port": "9000",  # pydantic-settings reads names case-insensitively
        "foldserve_max_dealy_ms": "1",
        "FOLDSERVE_MODEL_BATCHING": "{}",
        "PATH": "/bin",
        "MY_FOLDSERVE_THING": "x",  # not our prefix
    }
    assert unknown_env_names(environ) == ["FOLDSERVE_MAX_BATCHSIZE", "foldserve_max_dealy_ms"]
    assert unknown_env_names({}) == []


def test_the_warning_names_the_typo_a_suggestion_and_every_valid_name() -> None:
    message = unknown_env_message(["FOLDSERVE_MAX_BATCHSIZE", "FOLDSERVE_ZZZ"])
    assert "FOLDSERVE_MAX_BATCHSIZE (did you mean FOLDSERVE_MAX_BATCH_SIZE?)" in message
    assert "FOLDSERVE_ZZZ" in message and "FOLDSERVE_ZZZ (" not in message
    for name in env_names():
        assert name in message
    assert {"FOLDSERVE_MODEL_BATCHING", "FOLDSERVE_ADAPTIVE_DELAY"} <= set(env_names())


def test_per_model_batching_and_adaptive_delay_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "FOLDSERVE_MODEL_BATCHING", '{"digits-cnn": {"max_batch_size": 32, "max_delay_ms": 1}}'
    )
    monkeypatch.setenv("FOLDSERVE_ADAPTIVE_DELAY", "true")
    settings = Settings()
    assert settings.model_batching == {
        "digits-cnn": BatchingOverride(max_batch_size=32, max_delay_ms=1.0)
    }
    assert settings.adaptive_delay is True


@pytest.mark.parametrize(
    "value",
    ['{"digits-cnn": {"max_batch_size": 0}}', '{"digits-cnn": {"max_batchsize": 3}}'],
)
def test_bad_per_model_values_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FOLDSERVE_MODEL_BATCHING", value)
    with pytest.raises(ValueError, match="model_batching"):
        Settings()


def test_settings_travel_to_workers_as_variables_that_rebuild_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(
        model_store=Path("/srv/store"),
        workers=3,
        max_delay_ms=0.5,
        adaptive_delay=True,
        model_batching={"digits-cnn": BatchingOverride(max_batch_size=32)},
    )
    environ = to_environ(settings)
    assert environ["FOLDSERVE_MODEL_STORE"] == "/srv/store"
    assert "FOLDSERVE_MAX_BATCH_SIZE" not in environ  # unset stays unset
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_a_metrics_dir_without_workers_is_refused(tmp_path: Path) -> None:
    # One process does not write its metrics to files: a pooled /metrics would read nothing.
    with pytest.raises(ValueError, match="metrics_dir is set by the --workers supervisor"):
        Settings(metrics_dir=tmp_path)
    assert Settings(metrics_dir=tmp_path, workers=2).metrics_dir == tmp_path


def test_a_keyed_server_refuses_an_unkeyed_management_api_unless_told_it_is_meant() -> None:
    with pytest.raises(ValidationError, match="would let anyone load and unload models"):
        Settings(api_key="k", management_api=True)
    with pytest.raises(ValidationError, match="would let anyone load and unload models"):
        Settings(api_key_file=Path("/run/secrets/key"), management_api=True)
    Settings(api_key="k", management_api=True, management_api_key="m")
    Settings(api_key="k", management_api=True, management_api_open=True)
    Settings(management_api=True)  # no key anywhere: open throughout, and warned about at start


def test_an_unkeyed_management_api_is_warned_about_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    create_app(Settings(management_api=True))
    assert any("anyone who reaches this port" in r.getMessage() for r in caplog.records)
    caplog.clear()
    create_app(Settings(management_api=True, management_api_key="m"))
    assert not any("anyone who reaches this port" in r.getMessage() for r in caplog.records)
