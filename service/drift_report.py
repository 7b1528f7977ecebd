"""What a drift monitor reports (``GET /models/{name}/drift``, ``service.schemas.DriftAnswer``)
and what its fold thread publishes for it."""

from __future__ import annotations

from dataclasses import dataclass

from service.drift_moments import FeatureDrift, Sums


@dataclass(frozen=True)
class HiddenDrift:
    """One hidden BatchNorm's input (the raw rows mapped through ``map``) against its statistics."""

    layer: str
    map: str  # linear | conv2d
    axis: str
    source: str
    score: float | None
    drifted: bool
    samples: float  # this layer's decayed count: it samples within its own budget
    samples_folded: int
    features: list[FeatureDrift]


@dataclass(frozen=True)
class ResetNote:
    layer: str
    reason: str
    at: float  # Unix time, seconds


@dataclass(frozen=True)
class DriftReport:
    available: bool
    reason: str | None
    layer: str | None
    axis: str | None
    source: str | None
    score: float | None  # None before any sample, or without a reference
    threshold: float
    drifted: bool
    samples: float  # the decayed count of samples in the window
    window: int
    features: list[FeatureDrift]
    hidden: list[HiddenDrift]
    samples_observed: int  # rows given to observe since load
    samples_folded: int  # of them, rows the input layer folded in (since its last reset)
    cpu_budget: float | None  # None: unbounded, every row folded
    resets: int
    last_reset: ResetNote | None


@dataclass(frozen=True)
class Published:
    """What the fold thread last published, replaced whole (one assignment: safe to read from
    any thread)."""

    sums: tuple[Sums, ...]  # per layer, the input's first
    scores: tuple[float | None, ...]
    resets: int = 0
    last_reset: ResetNote | None = None
