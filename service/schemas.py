"""What the routes take and answer, as pydantic models: the OpenAPI document is built from them.

NOTE: documentation only. Requests are parsed by hand (``routes/predict.py``, ``routes/v2.py``)
and answers are written with orjson: validating them through these models would cost more than
a small model's inference. Tests check real answers against these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel


class ErrorAnswer(BaseModel):
    """Every error, on every route: one message."""

    error: str


def documented(model: type[BaseModel] | None, *errors: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: its answer, and the error statuses it may give."""
    responses: dict[int | str, dict[str, Any]] = {}
    if model is not None:
        responses[200] = {"model": model}
    for status in errors:
        responses[status] = {"model": ErrorAnswer}
    return responses


# ---------------------------------------------------------------- /predict


class PredictRequest(BaseModel):
    """Samples for one model; the model and version may also be named in the path."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] | dict[str, list[Any]] = Field(
        description="samples, each nested as the model's input shape or flat; numbers only. A "
        "model of several inputs takes one such list per input, by name"
    )
    model: str | None = Field(None, description="model name (default: the default model)")
    version: int | None = Field(None, ge=1, description="version (default: the model's default)")


class PredictAnswer(BaseModel):
    model: str
    version: int
    outputs: list[Any] | dict[str, list[Any]] = Field(
        description="one row of outputs per sample; by name for a model of several outputs"
    )
    predictions: list[str] | list[int] | None = Field(
        description="classifiers: each sample's label (or class index) of the first output; "
        "otherwise null"
    )


# ---------------------------------------------------------------- Open Inference Protocol (V2)

Datatype = Literal["FP32", "FP64", "FP16", "INT32", "INT64", "UINT8", "BYTES"]


class InferInputTensor(BaseModel):
    name: str
    shape: list[int] = Field(description="batch first: [n, *the model's input shape]")
    datatype: Datatype
    parameters: dict[str, Any] | None = Field(
        None, description='"binary_data_size": this tensor\'s bytes after the JSON header'
    )
    data: list[Any] | None = Field(None, description="the values, flat or nested (JSON)")


class InferOutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description='"binary_data": true to have this output as raw bytes'
    )


class InferRequest(BaseModel):
    """Other top-level fields are ignored, as the protocol allows."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    model_name: str | None = Field(None, description="if sent (KServe SDK), the path's model")
    model_version: str | None = Field(None, description="if sent, the path's version")
    parameters: dict[str, Any] | None = Field(
        None,
        description='"binary_data_output": true for raw output bytes; "timeout": microseconds',
    )
    inputs: list[InferInputTensor]
    outputs: list[InferOutputRequest] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32"]
    parameters: dict[str, Any] | None = Field(
        None, description='"binary_data_size" when the output follows the JSON as raw bytes'
    )
    data: list[float] | None = None


class InferAnswer(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LiveAnswer(BaseModel):
    live: bool


class ReadyAnswer(BaseModel):
    ready: bool


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks the batch dimension")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ModelReadyAnswer(BaseModel):
    name: str
    ready: bool


class ConfigTensor(BaseModel):
    name: str
    data_type: str
    dims: list[int]


class ModelConfig(BaseModel):
    """Triton's model configuration (the fields perf_analyzer and tritonclient read)."""

    name: str
    platform: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    dynamic_batching: dict[str, Any]
    version_policy: dict[str, Any]


class DurationStat(BaseModel):
    count: int
    ns: int


class InferenceStats(BaseModel):
    success: DurationStat
    fail: DurationStat
    queue: DurationStat
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat
    cache_hit: DurationStat
    cache_miss: DurationStat


class ModelStat(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="milliseconds since the epoch (0: never)")
    inference_count: int = Field(description="rows (samples) answered")
    execution_count: int = Field(description="backend runs (batches)")
    inference_stats: InferenceStats
    batch_stats: list[dict[str, Any]]


class ModelStatsAnswer(BaseModel):
    """Triton's statistics extension."""

    model_stats: list[ModelStat]


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE"]
    reason: str


class RepositoryIndex(RootModel[list[RepositoryEntry]]):
    """Triton's model repository extension: every version the store holds or the server serves."""


# ---------------------------------------------------------------- foldserve's own routes


class Liveness(BaseModel):
    status: Literal["alive"]
    pid: int = Field(description="the process that answered (one of several with --workers)")


class Readiness(BaseModel):
    ready: bool
    reason: str
    models: list[dict[str, Any]] | None = Field(
        None, description="every version and its status (left out when api_key is set)"
    )


class ModelVersions(BaseModel):
    name: str
    versions: list[dict[str, Any]] = Field(
        description="each version: status, reason, backend, checks, batching"
    )


class ModelsAnswer(BaseModel):
    default_model: str
    aliases: dict[str, str] = Field(
        description="names that are not a model's own and the model each means: a store of one "
        "model answers as default_model too (KServe: the InferenceService's name)"
    )
    models: list[ModelVersions]


# ---------------------------------------------------------------- /models/{name}/drift


class FeatureDriftAnswer(BaseModel):
    index: int
    name: str | None = Field(description="the feature's name; null (manifests name none yet)")
    live_mean: float | None = Field(description="null before any sample")
    ref_mean: float
    mean_shift: float | None = Field(description="(live mean - ref mean) / sqrt(ref var + floor)")
    live_var: float | None
    ref_var: float
    log_var_ratio: float | None = Field(description="ln((live var + floor) / (ref var + floor))")


class HiddenDriftAnswer(BaseModel):
    """One hidden BatchNorm's input, mapped from the live inputs, against its statistics."""

    layer: str
    map: Literal["linear", "conv2d"] = Field(description="how its input is made from the raw one")
    axis: Literal["feature", "channel"]
    source: str = Field(description="ema, population or as_imported")
    score: float | None = Field(description="null before any sample")
    drifted: bool = Field(description="score > threshold with at least min_samples in the window")
    samples: float = Field(description="this layer's decayed count of samples in its window")
    samples_folded: int = Field(
        description="rows this layer folded in since load (or its last reset): a layer dear "
        "per row samples within its CPU budget"
    )
    features: list[FeatureDriftAnswer]


class DriftResetAnswer(BaseModel):
    """The last time a layer's statistics were reset (non-finite sums, a failure)."""

    layer: str
    reason: str
    at: float = Field(description="Unix time, seconds")


class DriftAnswer(BaseModel):
    """Live inputs against the frozen statistics of the model's input BatchNorm (top level) and
    of the hidden BatchNorms cheap to observe at the input (``hidden``)."""

    model: str
    version: int
    available: bool = Field(description="false: the model has no input BatchNorm to compare with")
    reason: str | None
    layer: str | None = Field(
        description="the BatchNorm whose training statistics are the reference"
    )
    axis: Literal["feature", "channel"] | None
    source: str | None = Field(description="ema, population or as_imported")
    score: float | None = Field(description="null before any sample")
    threshold: float
    drifted: bool = Field(description="score > threshold with at least min_samples in the window")
    samples: float = Field(description="the decayed count of samples in the window")
    window: int
    features: list[FeatureDriftAnswer]
    hidden: list[HiddenDriftAnswer] = Field(
        description="hidden BatchNorms monitored through a map of the input (docs/drift.md)"
    )
    monitored: list[str] = Field(description="every monitored BatchNorm: the input's, then hidden")
    min_samples: int
    score_definition: str
    samples_observed: int = Field(description="rows of answered requests seen since load")
    samples_folded: int = Field(
        description="of them, rows the input BatchNorm's statistics took in (since load or "
        "its last reset); the others were left out to keep within cpu_budget or memory"
    )
    cpu_budget: float | None = Field(
        description="the share of one core the monitor may spend, all its layers together"
    )
    resets: int = Field(description="times a layer's statistics were reset since load")
    last_reset: DriftResetAnswer | None = Field(description="null: never reset")
