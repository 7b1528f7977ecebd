"""One monitored layer's arithmetic: decayed sums of its values standardized by the layer's
frozen BatchNorm statistics, and the drift score and per-feature detail read from them (the
definitions are in ``service.drift``'s docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.backends import Array
from service.monitor_maps import MonitorMap, weighted_sums
from service.store import HiddenStatistics, InputStatistics

Float64 = npt.NDArray[np.float64]
FLOOR_FRACTION = 0.01  # of the average reference variance, added to every variance


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
class HiddenLayer:
    """A monitored hidden BatchNorm: its statistics and the map from raw rows to its input."""

    statistics: HiddenStatistics
    map: MonitorMap


class Moments:
    """Decayed sums of one layer's values standardized by its frozen statistics (the score's
    arithmetic; the decayed sample count is the monitor's, shared by all its layers)."""

    def __init__(self, reference: InputStatistics) -> None:
        self.reference = reference
        self._mean = np.asarray(reference.mean, dtype=np.float64)
        self._var = np.asarray(reference.var, dtype=np.float64)
        self._floor = max(reference.eps, FLOOR_FRACTION * float(self._var.mean()), 1e-12)
        self._scale = np.sqrt(self._var + self._floor)
        self._inv_scale = (1.0 / self._scale).astype(np.float32)
        self._mean32 = self._mean.astype(np.float32)
        self.reset()

    def reset(self) -> None:
        self._sum = np.zeros_like(self._mean)  # decayed sums of z and z^2 per feature/channel
        self._sum_sq = np.zeros_like(self._mean)

    def add(self, values: Array, weights: Float64, keep: float) -> None:
        """``values``: (n, F) per feature, or (n, C, positions) per channel."""
        n, features = len(values), len(self._mean)
        if self.reference.axis == "feature":
            z = (values.reshape(n, features) - self._mean32) * self._inv_scale
            per_row, per_row_sq = z, z * z
        else:  # (n, C, *spatial): every position of a channel is one more sample of it
            z = (values.reshape(n, features, -1) - self._mean32[:, None]) * self._inv_scale[:, None]
            per_row, per_row_sq = z.mean(2, dtype=np.float64), (z * z).mean(2, dtype=np.float64)
        self.add_sums(weights @ per_row, weights @ per_row_sq, keep)

    def add_sums(self, sum_z: Float64, sum_z_sq: Float64, keep: float) -> None:
        """Decay the sums by ``keep``, then add a fold's weighted sums of z and z^2."""
        self._sum = self._sum * keep + sum_z
        self._sum_sq = self._sum_sq * keep + sum_z_sq

    def add_mapped(self, layer: HiddenLayer, rows: Array, weights: Float64, keep: float) -> None:
        """The hidden BN's input is ``layer.map`` of ``rows``: its sums come from the map's
        moments (service.monitor_maps.weighted_sums), never the (n, C, positions) values."""
        sums, sums_sq = weighted_sums(layer.map, rows, weights, self._mean)
        self.add_sums(sums / self._scale, sums_sq / self._scale**2, keep)

    def moments(self, weight: float) -> tuple[Float64, Float64]:
        """Live mean and variance of z per feature (zeros before any sample)."""
        if weight <= 0:
            return np.zeros_like(self._mean), np.zeros_like(self._mean)
        shift = self._sum / weight
        return shift, np.maximum(self._sum_sq / weight - shift**2, 0.0)

    def log_ratio(self, var_z: Float64) -> Float64:
        # (live var + floor) / (ref var + floor) = var_z + floor / (ref var + floor), with z
        # standardized by sqrt(ref var + floor): finite even for a feature constant throughout.
        result: Float64 = np.log(var_z + self._floor / self._scale**2)
        return result

    def score(self, weight: float) -> float | None:
        if weight <= 0:
            return None
        shift, var_z = self.moments(weight)
        score = float(np.abs(shift).mean() + np.abs(self.log_ratio(var_z)).mean())
        return score if math.isfinite(score) else None

    def features(self, weight: float) -> list[FeatureDrift]:
        shift, var_z = self.moments(weight)
        log_ratio, live = self.log_ratio(var_z), weight > 0
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
