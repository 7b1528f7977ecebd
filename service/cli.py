"""``foldserve serve`` runs the server; ``train``, ``export`` and ``import`` hand over to the
offline package (``foldserve``), which builds verified versions for the store."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.errors import ConfigError
from service.preflight import check_startup
from service.settings import Settings, describe_invalid, env_name, to_environ
from service.workers import (
    Supervisor,
    listening_sockets,
    metrics_dir_prefix,
    sweep_stale_metrics_dirs,
)

# Flags that map one to one onto Settings fields; unset flags leave env/defaults alone.
_SERVE_FLAGS = (
    "host",
    "port",
    "grpc_port",
    "model_store",
    "workers",
    "default_model",
    "backend",
    "device",
)
_BACKLOG = 2048  # the listening socket's queue, as service.server's
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the verified models of a model store",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to listen on (FOLDSERVE_HOST; 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (FOLDSERVE_PORT; 8000)")
    serve.add_argument(
        "--grpc-port", type=int, help="TCP port of the gRPC service (FOLDSERVE_GRPC_PORT; 8001)"
    )
    serve.add_argument("--model-store", help="model store folder (FOLDSERVE_MODEL_STORE)")
    serve.add_argument("--workers", type=int, help="server processes (FOLDSERVE_WORKERS; 1)")
    serve.add_argument("--default-model", help="model for requests naming none (digits-mlp)")
    serve.add_argument("--backend", choices=["onnx", "torchscript"], help="runtime (onnx)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (auto)")
    commands.add_parser("train", help="train a demo, fold and store it (needs foldserve[train])")
    commands.add_parser("export", help="fold and store your nn.Module (needs foldserve[train])")
    commands.add_parser("import", help="fold and store an ONNX file from any exporter")
    return parser


def settings_help() -> str:
    """Every setting with its variable, default and description, read off the Settings fields."""
    lines = ["every setting (flags above override these environment variables):"]
    width = max(len(env_name(name)) for name in Settings.model_fields)
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {env_name(name):<{width}} {default!s:<11} {field.description or ''}")
    return "\n".join(lines)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override FOLDSERVE_* variables, which override the defaults."""
    overrides = {k: getattr(args, k) for k in _SERVE_FLAGS if getattr(args, k) is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["train"], ["export"], ["import"]):
        return _offline(argv)  # the offline package owns its own flags
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"foldserve: invalid setting:\n{describe_invalid(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # e.g. a JSON value unparsed; its text names no value
        print(f"foldserve: invalid setting: {exc}", file=sys.stderr)
        return 2
    return _serve(settings)


def _serve(settings: Settings) -> int:
    from service.app import configure_logging, create_app, warn_unknown_env
    from service.server import serve

    configure_logging(settings.log_level, settings.log_format)
    unknown = warn_unknown_env(os.environ)
    if not settings.onnxruntime_telemetry:
        # NOTE: onnxruntime (1.29 and later) keeps a 2.5 MB telemetry database under
        # ~/.cache/Microsoft and reports to Microsoft unless this is set before its import: a
        # server should not phone home, and on a read-only root the writes fail loudly. Read
        # once when onnxruntime loads, so set here, before anything imports it.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        # Before listening, and before any worker starts: a supervisor restarting workers
        # that fail at once on a bad setting would only fill the log.
        check_startup(settings)
    except ConfigError as exc:
        # One line, through the log (stderr): what is wrong and how to fix it.
        log.critical("foldserve cannot start: %s", exc.message)
        return 2
    if settings.workers == 1:
        serve(create_app(settings), settings)
        return 0
    # NOTE: worker processes rebuild the app from FOLDSERVE_* variables, so the resolved settings
    # travel that way: each worker reads exactly what this process decided. Unknown ones were
    # reported above; dropped, so each worker does not repeat the warning.
    for name in unknown:
        del os.environ[name]
    try:
        sockets = listening_sockets(settings.host, settings.port, settings.workers, _BACKLOG)
    except ConfigError as exc:
        print(f"foldserve: {exc}", file=sys.stderr)
        return 1
    host, port = sockets[0].getsockname()[:2]
    logging.getLogger(__name__).info(
        "%d workers listening on http://%s:%d, one socket each (SO_REUSEPORT)",
        settings.workers,
        host,
        port,
    )
    try:
        for stale in sweep_stale_metrics_dirs(Path(tempfile.gettempdir())):
            logging.getLogger(__name__).info("removed %s, left by a server that was killed", stale)
        pooled = tempfile.TemporaryDirectory(prefix=metrics_dir_prefix())
    except OSError as exc:
        print(
            f"foldserve: --workers needs a writable temporary folder for the workers' metrics "
            f"({exc}): mount a tmpfs on /tmp or set TMPDIR",
            file=sys.stderr,
        )
        return 1
    with pooled as metrics_dir:
        settings = settings.model_copy(
            update={"metrics_dir": Path(metrics_dir), "load_before_serving": True}
        )
        os.environ.update(to_environ(settings))
        # Each worker drains within shutdown_grace_s, then its batchers (bounded by the
        # request timeout): allow for both before killing one.
        stop_timeout_s = settings.shutdown_grace_s + settings.request_timeout_s + 10
        supervisor = Supervisor(
            sockets, stop_timeout_s=stop_timeout_s, metrics_dir=Path(metrics_dir)
        )
        return supervisor.run()


def _offline(argv: list[str]) -> int:
    try:
        from foldserve.cli import main as offline_main
    except ImportError as exc:
        print(
            f"foldserve {argv[0]} needs the training extra ({exc}): pip install 'foldserve[train]'",
            file=sys.stderr,
        )
        return 2
    result: int = offline_main(argv)
    return result
