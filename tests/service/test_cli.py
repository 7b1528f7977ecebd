"""The command line: flags override FOLDSERVE_* variables, which override defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import build_parser, main, settings_from_args


def test_flags_override_environment_which_overrides_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FOLDSERVE_PORT", "9001")
    monkeypatch.setenv("FOLDSERVE_HOST", "0.0.0.0")
    args = build_parser().parse_args(["serve", "--port", "9002", "--model-store", "/srv/store"])
    settings = settings_from_args(args)
    assert settings.port == 9002  # flag beats env
    assert settings.host == "0.0.0.0"  # env beats default
    assert settings.model_store == Path("/srv/store")
    assert settings.default_model == "digits-mlp" and settings.workers == 1


def test_an_invalid_flag_value_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
