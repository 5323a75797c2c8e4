"""FedYogi: v moves additively towards the squared pseudo-gradient, so rare large updates fade slowly."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.fedopt import AdaptiveServerOptimizer, FedOptConfig


class FedYogiConfig(FedOptConfig):
    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment rate")


class FedYogi(AdaptiveServerOptimizer):
    name = "fedyogi"
    Config = FedYogiConfig
    config: FedYogiConfig

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return agg_math.yogi_second_moment(v, delta, self.config.beta2)
