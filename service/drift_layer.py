"""One monitored layer of a drift monitor: which of a fold's rows it takes (the newest, as many as
its CPU budget pays for), its values from them (the rows themselves, or a hidden BatchNorm's
input through its map) and its decayed sums. Used by the fold thread only; what readers see is
the immutable ``Sums`` it publishes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.backends import Array
from service.drift_budget import CpuBudget
from service.drift_moments import Moments, Sums
from service.monitor_maps import MonitorMap
from service.store import HiddenStatistics, InputStatistics

# NOTE: a fold maps at most this many floats at once (rows and map outputs: 4 MiB of float32,
# some 20 MiB with the temporaries), whatever the request's size: one ResNet-50 image's 7x7
# stem takes 2.6 M, so it goes one image at a time.
CHUNK_VALUES = 1 << 20


@dataclass(frozen=True)
class HiddenLayer:
    """A monitored hidden BatchNorm: its statistics and the map from raw rows to its input."""

    statistics: HiddenStatistics
    map: MonitorMap


class Rows:
    """A fold's pending requests (oldest first), read newest row first."""

    def __init__(self, arrays: Sequence[Array]) -> None:
        self._arrays = arrays
        lengths = np.fromiter((len(array) for array in arrays), np.int64, len(arrays))
        self._ends = np.cumsum(lengths)  # the row after each request's last, all concatenated
        self.count = int(self._ends[-1]) if len(arrays) else 0
        self.row_size = next((array[0].size for array in arrays if len(array)), 0)  # floats a row

    def newest(self, skip: int, take: int) -> Array:
        """The ``take`` rows after the newest ``skip``, oldest first: (take, *sample shape).

        NOTE: the requests at both ends are found by bisection, and only they are sliced: many
        one-row requests cost one concatenation, not a Python step each.
        """
        low, high = self.count - skip - take, self.count - skip  # rows [low, high), in order
        first = int(np.searchsorted(self._ends, low, side="right"))
        last = int(np.searchsorted(self._ends, high - 1, side="right"))
        start_first = int(self._ends[first]) - len(self._arrays[first])
        if first == last:
            return self._arrays[first][low - start_first : high - start_first]
        start_last = int(self._ends[last]) - len(self._arrays[last])
        return np.concatenate(
            [
                self._arrays[first][low - start_first :],
                *self._arrays[first + 1 : last],
                self._arrays[last][: high - start_last],
            ]
        )


class MonitoredLayer:
    """Decayed sums of one layer's standardized values; see ``service.drift``."""

    def __init__(
        self,
        statistics: InputStatistics,
        values: Callable[[Array], Array],
        mapped_per_row: int,
        window: int,
        budget: CpuBudget | None,
    ) -> None:
        self.statistics, self.moments, self.budget = statistics, Moments(statistics), budget
        self._values = values  # rows (n, *sample shape) -> this layer's values
        self._mapped_per_row = mapped_per_row  # floats a map makes of one row (0: no map)
        self._decay = 1.0 - 1.0 / window
        self.sums = self.moments.empty()

    @classmethod
    def of_input(
        cls, statistics: InputStatistics, window: int, budget: CpuBudget | None
    ) -> MonitoredLayer:
        return cls(statistics, lambda rows: rows, 0, window, budget)

    @classmethod
    def of_hidden(cls, layer: HiddenLayer, window: int, budget: CpuBudget | None) -> MonitoredLayer:
        return cls(layer.statistics, layer.map.apply, layer.map.values_per_row, window, budget)

    def fold(self, rows: Rows) -> float:
        """Add the newest of ``rows`` that the budget allows, each weighing decay^(its age in
        rows taken), as if folded one row at a time; older ones are left out (sampled). The CPU
        seconds charged to the budget."""
        total_z, total_z_sq = np.zeros_like(self.sums.z), np.zeros_like(self.sums.z_sq)
        weight, taken, charged = 0.0, 0, 0.0
        chunk_rows = max(1, CHUNK_VALUES // (rows.row_size + self._mapped_per_row))
        while taken < rows.count:
            limit = min(rows.count - taken, chunk_rows)
            n = limit if self.budget is None else self.budget.rows(limit)
            if n == 0:
                break
            started = time.thread_time()
            chunk = rows.newest(taken, n)
            # The chunk's last row is the newest of it: age ``taken``; its first ``taken + n - 1``.
            weights = self._decay ** np.arange(taken + n - 1, taken - 1, -1, dtype=np.float64)
            # NOTE: a huge finite row may overflow float32 in the map or in z: expected, and
            # clipped to Z_LIMIT; numpy's warning (an error under pytest) is not.
            with np.errstate(over="ignore", invalid="ignore"):
                chunk_z, chunk_z_sq = self.moments.weighted_sums(self._values(chunk), weights)
            total_z += chunk_z
            total_z_sq += chunk_z_sq
            weight += float(weights.sum())
            taken += n
            spent = time.thread_time() - started
            charged += spent
            if self.budget is not None:
                self.budget.charge(spent, n)
        if taken:
            keep, sums = self._decay**taken, self.sums
            self.sums = Sums(
                sums.z * keep + total_z,
                sums.z_sq * keep + total_z_sq,
                sums.weight * keep + weight,
                sums.rows + taken,
            )
        return charged

    def reset(self) -> None:
        self.sums = self.moments.empty()
