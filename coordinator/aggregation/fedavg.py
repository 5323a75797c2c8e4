"""FedAvg (McMahan et al. 2017): the next model moves by the sample-weighted mean of the updates."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.accumulators import MeanAccumulator
from coordinator.aggregation.base import Strategy, StrategyConfig, UpdateAccumulator, Weighting


class FedAvgConfig(StrategyConfig):
    weighting: Weighting = "samples"
    server_lr: float = Field(1.0, gt=0, le=10, description="step along the mean update; 1.0 is plain FedAvg")


class FedAvg(Strategy):
    name = "fedavg"
    Config: ClassVar[type[StrategyConfig]] = FedAvgConfig
    config: FedAvgConfig

    def new_accumulator(self, n_params: int, spill_dir: str | Path | None = None) -> UpdateAccumulator:
        return MeanAccumulator(n_params, self.config.weighting)

    def aggregate(self, global_params: np.ndarray, accumulator: UpdateAccumulator) -> np.ndarray:
        params = self._check_round(global_params, accumulator)
        return agg_math.apply_delta(params, accumulator.result(), self.config.server_lr)
