"""Coordinate-wise median (Yin et al. 2018): each parameter takes the median of the updates' values.

Robust to a minority of arbitrary (poisoned or broken) updates; unweighted, so a device cannot buy
influence by claiming many samples. It needs every update, so they spill to disk (see SpillAccumulator).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.accumulators import SpillAccumulator
from coordinator.aggregation.base import Strategy, StrategyConfig, UpdateAccumulator


class RobustConfig(StrategyConfig):
    chunk_mb: int = Field(32, ge=1, le=4096, description="memory for one chunk of parameters x updates")


class CoordinateMedian(Strategy):
    name = "coordinate_median"
    Config = RobustConfig
    config: RobustConfig

    def new_accumulator(self, n_params: int, spill_dir: str | Path | None = None) -> UpdateAccumulator:
        return SpillAccumulator(n_params, agg_math.coordinate_median, spill_dir, self.config.chunk_mb * 2**20)

    def aggregate(self, global_params: np.ndarray, accumulator: UpdateAccumulator) -> np.ndarray:
        params = self._check_round(global_params, accumulator)
        return agg_math.apply_delta(params, accumulator.result())
