"""Coordinate-wise trimmed mean (Yin et al. 2018): per parameter, drop the beta tails, average the rest.

With n updates, int(beta * n) values are dropped at each end (as scipy.stats.trim_mean), so up to that
many poisoned updates per side cannot pull a parameter outside the honest ones' range. Unweighted.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
from pydantic import Field

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.accumulators import SpillAccumulator
from coordinator.aggregation.base import Strategy, UpdateAccumulator
from coordinator.aggregation.median import RobustConfig

log = logging.getLogger(__name__)


class TrimmedMeanConfig(RobustConfig):
    beta: float = Field(0.1, ge=0, lt=0.5, description="fraction of updates trimmed at each end")


class TrimmedMean(Strategy):
    name = "trimmed_mean"
    Config = TrimmedMeanConfig
    config: TrimmedMeanConfig

    def new_accumulator(self, n_params: int, spill_dir: str | Path | None = None) -> UpdateAccumulator:
        statistic = partial(agg_math.trimmed_mean, beta=self.config.beta)
        return SpillAccumulator(n_params, statistic, spill_dir, self.config.chunk_mb * 2**20)

    def aggregate(self, global_params: np.ndarray, accumulator: UpdateAccumulator) -> np.ndarray:
        params = self._check_round(global_params, accumulator)
        if self.config.beta > 0 and agg_math.n_trimmed(accumulator.count, self.config.beta) == 0:
            log.warning(
                "trimmed_mean with beta=%g trims nothing from %d updates (a plain mean, not robust): "
                "raise beta to at least %.3g or the round's quorum",
                self.config.beta,
                accumulator.count,
                1 / accumulator.count,
            )
        return agg_math.apply_delta(params, accumulator.result())
