"""The one settings object: every field is a CLI flag and a ``FOLDSERVE_*`` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
BackendName = Literal["onnx", "torchscript"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FOLDSERVE_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    workers: int = Field(1, ge=1, description="server processes, each with its own sessions")
    model_store: Path = Field(Path("model_store"), description="folder of <name>/<version>/ models")
    default_model: str = Field("digits-mlp", description="model answering requests naming none")
    backend: BackendName = Field("onnx", description="runtime: onnx (onnxruntime) or torchscript")
    device: Device = Field(
        "auto",
        description="auto: CUDA when present, else CPU (logged); cuda: missing GPU is an error",
    )
    intra_op_threads: int = Field(1, ge=1, description="threads per inference session")
    max_batch_size: int | None = Field(None, ge=1, description="override every manifest's row cap")
    max_delay_ms: float | None = Field(None, ge=0, description="override every manifest's delay")
    max_queue_rows: int = Field(4096, ge=1, description="rows waiting per model before 503")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest accepted request body")
    request_timeout_s: float = Field(30.0, gt=0, description="longest wait for an inference result")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
