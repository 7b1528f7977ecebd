"""The command line: flags override FOLDSERVE_* variables, which override defaults."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from service import cli, server
from service.app import app_from_env
from service.cli import build_parser, main, settings_from_args
from service.settings import Settings


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


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private os.environ for the test: serve writes the workers' variables into it."""
    fake = {k: v for k, v in os.environ.items() if not k.upper().startswith("FOLDSERVE_")}
    fake["FOLDSERVE_GRPC"] = "false"  # its own port: off, as in every test server
    monkeypatch.setattr(os, "environ", fake)
    return fake


@pytest.fixture
def serve_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Settings]]:
    """What one server process would run: the app and its settings, instead of running."""
    calls: list[tuple[Any, Settings]] = []

    def fake_serve(app: Any, settings: Settings, *_: Any, **__: Any) -> None:
        calls.append((app, settings))

    monkeypatch.setattr(server, "serve", fake_serve)
    return calls


def test_serve_warns_about_unknown_foldserve_variables(
    environ: dict[str, str],
    serve_calls: list[tuple[Any, Settings]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ.update(FOLDSERVE_MAX_BATCHSIZE="32", FOLDSERVE_PORT="9001")
    with caplog.at_level(logging.WARNING, logger="service.app"):
        assert main(["serve"]) == 0  # the shipped store: it passes the checks at start
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "service.app"]
    assert "FOLDSERVE_MAX_BATCHSIZE (did you mean FOLDSERVE_MAX_BATCH_SIZE?)" in warning
    assert "valid names: FOLDSERVE_HOST, FOLDSERVE_PORT" in warning
    ((_, settings),) = serve_calls
    assert settings.port == 9001


def test_the_access_log_reads_proxy_headers_only_when_asked(
    environ: dict[str, str], serve_calls: list[tuple[Any, Settings]]
) -> None:
    environ["FOLDSERVE_ACCESS_LOG"] = "true"
    assert main(["serve"]) == 0  # the shipped store: it passes the checks at start
    environ["FOLDSERVE_PROXY_HEADERS"] = "true"
    assert main(["serve"]) == 0  # the shipped store: it passes the checks at start
    assert [app.access_log.proxy_headers for app, _ in serve_calls] == [False, True]


@pytest.fixture
def supervised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[socket.socket], Settings]]:
    """Records what the supervisor would start the workers with, instead of starting them:
    the sockets, and the settings each worker derives from the environment."""
    calls: list[tuple[list[socket.socket], Settings]] = []

    class FakeSupervisor:
        def __init__(self, sockets: list[socket.socket], **_: Any):
            calls.append((sockets, Settings()))

        def run(self) -> int:
            for sock in calls[-1][0]:
                sock.close()
            return 0

    monkeypatch.setattr(cli, "Supervisor", FakeSupervisor)
    return calls


def test_workers_get_the_resolved_settings_and_not_the_typos(
    environ: dict[str, str],
    supervised: list[tuple[list[socket.socket], Settings]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ.update(
        FOLDSERVE_MAX_BATCHSIZE="32",
        FOLDSERVE_MODEL_BATCHING='{"digits-cnn": {"max_batch_size": 32}}',
    )
    with caplog.at_level(logging.WARNING, logger="service.app"):
        assert main(["serve", "--workers", "2", "--port", "0"]) == 0
        ((sockets, options),) = supervised
        assert len(sockets) == 2 and options.log_level == "info"
        assert "FOLDSERVE_MAX_BATCHSIZE" not in environ  # reported once here, not per worker
        assert environ["FOLDSERVE_PORT"] == "0"
        app_from_env()  # what each worker does
    settings = Settings()
    assert settings.workers == 2
    assert settings.model_batching["digits-cnn"].max_batch_size == 32
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.app"]
    assert len(warnings) == 1 and "FOLDSERVE_MAX_BATCHSIZE" in warnings[0]


def test_workers_on_a_port_in_use_fail_with_a_message(
    environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert main(["serve", "--workers", "2", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_app_from_env_warns_about_unknown_foldserve_variables(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    environ["FOLDSERVE_DEFAULT_MODLE"] = "digits-cnn"
    with caplog.at_level(logging.WARNING, logger="service.app"):
        app_from_env()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "service.app"]
    assert "FOLDSERVE_DEFAULT_MODLE (did you mean FOLDSERVE_DEFAULT_MODEL?)" in warning


def test_an_unreadable_json_setting_is_reported_not_raised(
    environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    environ["FOLDSERVE_MODEL_BATCHING"] = "{digits-cnn: 32}"
    assert main(["serve"]) == 2
    assert "model_batching" in capsys.readouterr().err


def test_serve_help_lists_every_setting_with_its_variable() -> None:
    from service.cli import build_parser
    from service.settings import env_names

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    missing = [name for name in env_names() if name not in text]
    assert not missing
