"""One monitored layer's arithmetic: decayed sums of its values standardized by the layer's
frozen BatchNorm statistics, and the drift score and per-feature detail read from them (the
definitions are in ``service.drift``'s docstring).

Any finite input keeps the sums finite: each standardized value z is clipped to ``Z_LIMIT``
before it is squared (a value that far out, or one the map overflowed to inf or NaN, counts as
exactly that far: "very drifted"), so a sum never exceeds ``Z_LIMIT**2`` times its weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.backends import Array
from service.store import InputStatistics

Float64 = npt.NDArray[np.float64]
FLOOR_FRACTION = 0.01  # of the average reference variance, added to every variance
# NOTE: a thousand reference standard deviations is drifted beyond doubt; a larger bound only
# slows the recovery: one row clipped in every feature after the held-out digits scores 10.3 on
# digits-mlp, and 7 windows of normal rows bring it back under the threshold (docs/drift.md).
Z_LIMIT = 1e3


@dataclass(frozen=True)
class FeatureDrift:
    index: int
    name: str | None  # manifests name no features yet
    live_mean: float | None  # None before any sample
    ref_mean: float
    mean_shift: float | None  # (live mean - ref mean) / sqrt(ref var + floor)
    live_var: float | None
    ref_var: float
    log_var_ratio: float | None  # ln((live var + floor) / (ref var + floor))


@dataclass(frozen=True)
class Sums:
    """A layer's decayed sums of z and z^2 per feature, and of the samples' weights. Never
    mutated once made: the fold thread publishes a new one, readers keep the one they got."""

    z: Float64
    z_sq: Float64
    weight: float  # the decayed sample count
    rows: int  # rows folded in since the monitor started (or was last reset)

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.z).all() and np.isfinite(self.z_sq).all())


class Moments:
    """The arithmetic of one layer against its frozen statistics (thread-safe: no state)."""

    def __init__(self, reference: InputStatistics) -> None:
        self.reference = reference
        self._mean = np.asarray(reference.mean, dtype=np.float64)
        self._var = np.asarray(reference.var, dtype=np.float64)
        self._floor = max(reference.eps, FLOOR_FRACTION * float(self._var.mean()), 1e-12)
        self._scale = np.sqrt(self._var + self._floor)
        self._inv_scale = (1.0 / self._scale).astype(np.float32)
        self._mean32 = self._mean.astype(np.float32)

    def empty(self) -> Sums:
        return Sums(np.zeros_like(self._mean), np.zeros_like(self._mean), 0.0, 0)

    def weighted_sums(self, values: Array, weights: Float64) -> tuple[Float64, Float64]:
        """``sum_j weights_j z_j`` and the same of ``z_j^2`` per feature, z of row j its values
        (n, F) or (n, C, *positions) standardized (a channel's positions averaged), each
        clipped to +-Z_LIMIT: finite whatever the values."""
        first, second = self._per_row(values)
        sums, sums_sq = weights @ first, weights @ second
        if np.isnan(sums).any() or np.isnan(sums_sq).any():
            # NOTE: only a map's inf - inf makes a NaN (the row is that far out, its sign
            # unknown); found in the sums, so the common case pays no pass over the rows.
            unknown = np.isnan(first) | np.isnan(second)
            first[unknown], second[unknown] = Z_LIMIT, Z_LIMIT**2
            sums, sums_sq = weights @ first, weights @ second
        return sums, sums_sq

    def _per_row(self, values: Array) -> tuple[Float64, Float64]:
        n, features = len(values), len(self._mean)
        if self.reference.axis == "feature":
            mean, inv_scale = self._mean32, self._inv_scale
            z = np.subtract(values.reshape(n, features), mean, dtype=np.float32)
        else:  # every position of a channel is one more sample of it
            mean, inv_scale = self._mean32[:, None], self._inv_scale[:, None]
            z = np.subtract(values.reshape(n, features, -1), mean, dtype=np.float32)
        z *= inv_scale
        # NOTE: float32 is exact enough for z and half the cost; clipping also turns the inf of
        # an overflow into the limit, and the squares below it cannot overflow.
        np.clip(z, -Z_LIMIT, Z_LIMIT, out=z)
        if z.ndim == 2:  # float64 from here: the sums over rows must not cancel
            first = z.astype(np.float64)
            return first, np.square(first)
        first = z.mean(2, dtype=np.float64)
        return first, np.square(z, out=z).mean(2, dtype=np.float64)

    def moments(self, sums: Sums) -> tuple[Float64, Float64]:
        """Live mean and variance of z per feature (zeros before any sample)."""
        if sums.weight <= 0:
            return np.zeros_like(self._mean), np.zeros_like(self._mean)
        shift = sums.z / sums.weight
        return shift, np.maximum(sums.z_sq / sums.weight - shift**2, 0.0)

    def log_ratio(self, var_z: Float64) -> Float64:
        # (live var + floor) / (ref var + floor) = var_z + floor / (ref var + floor), with z
        # standardized by sqrt(ref var + floor): finite even for a feature constant throughout.
        result: Float64 = np.log(var_z + self._floor / self._scale**2)
        return result

    def score(self, sums: Sums) -> float | None:
        if sums.weight <= 0:
            return None
        shift, var_z = self.moments(sums)
        score = float(np.abs(shift).mean() + np.abs(self.log_ratio(var_z)).mean())
        return score if math.isfinite(score) else None

    def features(self, sums: Sums) -> list[FeatureDrift]:
        shift, var_z = self.moments(sums)
        log_ratio, live = self.log_ratio(var_z), sums.weight > 0
        features = []
        for i in range(len(self._mean)):
            live_var = float(var_z[i] * self._scale[i] ** 2) if live else None
            features.append(
                FeatureDrift(
                    index=i,
                    name=None,
                    live_mean=float(self._mean[i] + shift[i] * self._scale[i]) if live else None,
                    ref_mean=float(self._mean[i]),
                    mean_shift=float(shift[i]) if live else None,
                    live_var=live_var,
                    ref_var=float(self._var[i]),
                    log_var_ratio=float(log_ratio[i]) if live else None,
                )
            )
        return features
