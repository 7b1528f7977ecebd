"""The one settings object: every field is a ``FOLDSERVE_*`` environment variable (most are flags).

This module is the only one that knows the prefix: the CLI hands settings to worker processes
with ``to_environ`` and asks ``unknown_env_names`` which variables are typos.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
BackendName = Literal["onnx", "torchscript"]
ENV_PREFIX = "FOLDSERVE_"


class BatchingOverride(BaseModel):
    """One model's batching values; each one set here beats the global setting and the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, ge=1, description="cap on rows per backend call")
    max_delay_ms: float | None = Field(None, ge=0, description="longest wait for batch mates")


class VersionPolicy(BaseModel):
    """Which versions of one model are served, and which answers requests naming none.

    ``latest``: the newest N versions; ``versions``: exactly these; neither: all of them.
    ``default``: the version for requests naming none (else the newest ready one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: int | None = Field(None, ge=1, description="serve the newest N versions")
    versions: list[int] | None = Field(None, description="serve exactly these versions")
    default: int | None = Field(None, ge=1, description="version for requests naming none")

    @model_validator(mode="after")
    def _one_rule(self) -> VersionPolicy:
        if self.latest is not None and self.versions is not None:
            raise ValueError("give latest or versions, not both")
        return self

    def wanted(self, available: list[int]) -> list[int]:
        if self.versions is not None:
            return [v for v in available if v in self.versions]
        if self.latest is not None:
            return sorted(available)[-self.latest :]
        return list(available)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    workers: int = Field(1, ge=1, description="server processes, each with its own sessions")
    grpc: bool = Field(
        True, description="serve the Open Inference Protocol's gRPC service on grpc_port too"
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="TCP port of the gRPC service (0: one the OS picks)"
    )
    # NOTE: also one model's <version>/ folders or one version's files (service.store.open_store
    # reads the layout off the folder): what KServe's storage initializer puts at /mnt/models.
    model_store: Path = Field(
        Path("model_store"),
        description="folder of <name>/<version>/ models, or of one model or one version",
    )
    default_model: str = Field(
        "digits-mlp",
        description="model answering requests naming none; a store of one model serves it "
        "under this name too, whatever its manifest calls it",
    )
    missing_model: Literal["exit", "unready"] = Field(
        "exit",
        description="default_model not in a store of several models: exit (2, one line) or "
        "unready (serve the others; readiness says why until it arrives)",
    )
    backend: BackendName = Field("onnx", description="runtime: onnx (onnxruntime) or torchscript")
    # NOTE: loading a TorchScript file runs code the file carries; ONNX files are data only.
    allow_torchscript: bool = Field(
        False, description="let --backend torchscript load TorchScript files (they carry code)"
    )
    device: Device = Field(
        "auto",
        description="auto: CUDA when present, else CPU (logged); cuda: missing GPU is an error",
    )
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        description="threads per inference session (unset: every usable CPU for a model whose "
        "one row takes 1 ms or more, else one; said in the log at load)",
    )
    onnxruntime_telemetry: bool = Field(
        False,
        description="let onnxruntime keep its telemetry (a database under ~/.cache/Microsoft, "
        "reports to Microsoft); off: foldserve serve sets ORT_DISABLE_TELEMETRY=1 for it",
    )
    measure_batching: bool = Field(
        True,
        description="serve a slow model (a row takes 1 ms or more) one row per run when a batch "
        "of up to 8 rows, timed at load, gives under 1.1x the rows per second (its memory buys "
        "nothing); max_batch_size set anywhere wins",
    )
    parallel_runs: int | None = Field(
        None,
        ge=1,
        description="one-thread runs at once for queued requests of a model given several "
        "threads (a lone row keeps every thread; unset: the usable CPUs, onnxruntime on the "
        "CPU, when intra_op_threads is unset and the outputs match bit for bit; 1: never)",
    )
    max_batch_size: int | None = Field(None, ge=1, description="override every manifest's row cap")
    max_delay_ms: float | None = Field(None, ge=0, description="override every manifest's delay")
    # NOTE: a dict field: pydantic-settings reads FOLDSERVE_MODEL_BATCHING as JSON, e.g.
    # '{"digits-cnn": {"max_batch_size": 32, "max_delay_ms": 1}}'.
    model_batching: dict[str, BatchingOverride] = Field(
        default_factory=dict,
        description="per-model batching by model name; beats max_batch_size/max_delay_ms",
    )
    adaptive_delay: bool = Field(
        True, description="skip the batch wait while requests arrive one at a time"
    )
    inline_max_ms: float = Field(
        0.5,
        ge=0,
        description="run a model on the event loop when a full batch takes less (0: never)",
    )
    access_log: bool = Field(
        False,
        description="one log line per request: request id, model, version, rows, status, "
        "latency (costs throughput, see access_log_sample)",
    )
    access_log_sample: float = Field(
        1.0, ge=0, le=1, description="fraction of requests the access log writes (drawn at random)"
    )
    proxy_headers: bool = Field(
        False, description="the access log's client address from a proxy's X-Forwarded-For"
    )
    max_queue_rows: int = Field(4096, ge=1, description="rows waiting per model before 503")
    # NOTE: rows alone do not bound memory: 4096 queued 3x224x224 images are 2.4 GB. The
    # lower of the two bounds applies to each model, from its per-sample input size.
    max_queue_bytes: int = Field(
        256 << 20, ge=1024, description="input bytes waiting per model before 503"
    )
    # NOTE: 64 MiB of binary tensors: ~100 images of 3x224x224 as V2 binary (0.6 MB each).
    max_body_bytes: int = Field(
        64 << 20, ge=1024, description="largest accepted request body (413 above)"
    )
    # NOTE: a JSON body is parsed on the event loop, at ~5 ms per MB of typical floats (and up to
    # ~40 ms per MB of one-digit numbers), while nothing else is served: these two bound that
    # pause. Larger tensors go as V2 binary tensors, which are not parsed at all.
    # NOTE: 16.8M pixels (4096x4096) decode to 50 MB of RGB; a PNG claiming more is refused from
    # its header, before a pixel is decoded.
    max_image_pixels: int = Field(
        1 << 24, ge=1, description="pixels of one image sent to an image model (413 above)"
    )
    max_json_bytes: int = Field(
        8 << 20, ge=1024, description="largest JSON body (or V2 JSON header), as decoded (413)"
    )
    max_json_items: int = Field(
        1 << 19,
        ge=1,
        description="numbers and lists a JSON body may hold: what its parsing costs (413)",
    )
    max_body_memory_bytes: int = Field(
        256 << 20,
        ge=1 << 20,
        description="request bodies held at once in this process, all requests together "
        "(503 past it)",
    )
    max_header_bytes: int = Field(
        65_536, ge=1024, description="request line and headers of one request (431 past it)"
    )
    max_headers: int = Field(100, ge=8, description="header fields of one request (431 past it)")
    require_bitwise_invariance: bool = Field(
        False, description="serve only models measured bit for bit the same in any batch"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="longest wait for an inference result")
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        description="on SIGTERM/SIGINT, longest wait for requests in flight before exiting",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this, else 408"
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request's body must arrive within this after its headers, else 408",
    )
    keep_alive_timeout_s: float = Field(
        5.0,
        gt=0,
        description="an idle connection (before or between requests) is closed after this",
    )
    max_connections: int = Field(
        2048,
        ge=1,
        description="open connections per process; past it 503 (health probes still answered)",
    )
    poll_interval_s: float | None = Field(
        None, gt=0, description="rescan the store this often for new, changed or removed versions"
    )
    # NOTE: a dict field read as JSON, e.g. '{"digits-mlp": {"latest": 2, "default": 1}}'.
    model_versions: dict[str, VersionPolicy] = Field(
        default_factory=dict, description="per model: which versions to serve, and the default"
    )
    management_api: bool = Field(
        False,
        description="serve the model repository API (/v2/repository/...: index, load, unload)",
    )
    management_api_key: str | None = Field(
        None,
        description="key the repository API requires (Authorization: Bearer or X-API-Key); "
        "several separated by commas",
        repr=False,
    )
    management_api_open: bool = Field(
        False,
        description="serve the repository API without a key even though inference needs one "
        "(otherwise that is refused at start)",
    )
    api_key: str | None = Field(
        None,
        description="key the inference and model routes require (Authorization: Bearer or "
        "X-API-Key); several separated by commas",
        repr=False,
    )
    api_key_file: Path | None = Field(
        None,
        description="file of further inference keys, one per line ('#' starts a comment); "
        "read at start and again at every rescan (SIGHUP, poll_interval_s)",
    )
    metrics_require_key: bool = Field(
        False, description="/metrics requires the inference key too (else it is open)"
    )
    docs: bool = Field(
        False,
        description="serve /docs and /redoc, and /openapi.json without a key (it is always "
        "served; with api_key it otherwise needs the key)",
    )
    load_before_serving: bool = Field(
        False,
        description="accept no connection until the models are loaded and verified (set for "
        "--workers processes: connections wait in the kernel's queue, not for a 503)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: every line one JSON object"
    )
    metrics_dir: Path | None = Field(
        None, description="where --workers processes pool their metrics (the supervisor sets it)"
    )
    drift_threshold: float = Field(
        0.5, gt=0, description="input drift score above which a model is reported drifted"
    )

    @model_validator(mode="after")
    def _keys_not_silently_off(self) -> Settings:
        # NOTE: a key setting that is present but holds no key (an empty variable from a
        # template or a missing secret) would turn authentication off without a word.
        for field in ("api_key", "management_api_key"):
            value = getattr(self, field)
            if value is not None and not any(key.strip() for key in value.split(",")):
                raise ValueError(
                    f"{field} ({env_name(field)}) is set but holds no key: give one or more "
                    "keys separated by commas, or unset it to require none"
                )
        inference_keyed = self.api_key is not None or self.api_key_file is not None
        if (
            self.management_api
            and self.management_api_key is None
            and inference_keyed
            and not self.management_api_open
        ):
            # NOTE: an operator who keys inference and turns the repository API on has not
            # meant anyone to unload the models: refused, not warned about in a log nobody reads.
            raise ValueError(
                "management_api (FOLDSERVE_MANAGEMENT_API=true) would let anyone load and unload "
                "models while inference needs a key: set management_api_key "
                "(FOLDSERVE_MANAGEMENT_API_KEY), or FOLDSERVE_MANAGEMENT_API_OPEN=true to serve "
                "it without one"
            )
        if self.metrics_require_key and self.api_key is None and self.api_key_file is None:
            raise ValueError(
                "metrics_require_key needs the inference key: set api_key (FOLDSERVE_API_KEY) "
                "or api_key_file (FOLDSERVE_API_KEY_FILE)"
            )
        return self

    @model_validator(mode="after")
    def _metrics_dir_needs_workers(self) -> Settings:
        # NOTE: the folder is only read, never written, unless prometheus_client was switched to
        # files before import; the supervisor does both for its workers, nobody else can.
        if self.metrics_dir is not None and self.workers == 1:
            raise ValueError("metrics_dir is set by the --workers supervisor; leave it unset")
        return self


SECRET_FIELDS = frozenset({"api_key", "management_api_key"})


def describe_invalid(exc: ValidationError) -> str:
    """A settings error, one line per problem, naming values but never a key.

    NOTE: pydantic's own text shows every input, and for a check across fields that is the
    whole set of settings, keys included.
    """
    lines = []
    for error in exc.errors():
        field = ".".join(map(str, error["loc"]))
        where = f"{field} ({env_name(field)}): " if field in Settings.model_fields else ""
        shown = ""
        value = error.get("input")
        if field and field.split(".")[0] not in SECRET_FIELDS and isinstance(value, str | int):
            shown = f", got {value if isinstance(value, int) else repr(value[:80])}"
        lines.append(f"  {where}{error['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def setting_ref(field: str, value: object, gloss: str = "") -> str:
    """How a message names a setting: ``max_body_bytes (FOLDSERVE_MAX_BODY_BYTES=67108864)``,
    with ``gloss`` after the value when given (e.g. the value in MB)."""
    if field not in Settings.model_fields:
        raise KeyError(f"{field!r} is not a setting")
    shown = json.dumps(value) if isinstance(value, bool) else value
    return f"{field} ({env_name(field)}={shown}{', ' + gloss if gloss else ''})"


def torchscript_not_allowed() -> str:
    return (
        f"{setting_ref('backend', 'torchscript')}: loading a TorchScript file runs the code it "
        "carries; serve the ONNX files, or set FOLDSERVE_ALLOW_TORCHSCRIPT=true for a store you "
        "trust"
    )


def env_names() -> list[str]:
    """Every environment variable a Settings field reads, in field order."""
    return [env_name(field) for field in Settings.model_fields]


def unknown_env_names(environ: Mapping[str, str]) -> list[str]:
    """``FOLDSERVE_*`` names in ``environ`` that no field reads (typos, removed settings)."""
    known = set(env_names())
    # NOTE: pydantic-settings matches names case-insensitively, so foldserve_port is not a typo.
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    )


def unknown_env_message(unknown: list[str]) -> str:
    """A warning naming each unknown variable, the closest valid name, and all valid names."""
    valid = env_names()
    fields = [name.removeprefix(ENV_PREFIX) for name in valid]
    parts = []
    for name in unknown:
        # Compared without the prefix, which every name shares and would make all look close.
        close = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), fields, n=1)
        parts.append(f"{name} (did you mean {ENV_PREFIX}{close[0]}?)" if close else name)
    return (
        f"ignoring unknown environment variable{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(parts)}: not a foldserve setting; valid names: {', '.join(valid)}"
    )


def to_environ(settings: Settings) -> dict[str, str]:
    """The settings as the variables that rebuild them: how worker processes receive them."""
    environ = {}
    for field, value in settings.model_dump(mode="json", exclude_none=True).items():
        # Strings as they are; everything else as JSON, which pydantic-settings parses back.
        environ[env_name(field)] = value if isinstance(value, str) else json.dumps(value)
    return environ
