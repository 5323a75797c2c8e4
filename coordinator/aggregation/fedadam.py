"""FedAdam: v follows the squared pseudo-gradient with an exponential moving average."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.fedopt import AdaptiveServerOptimizer, FedOptConfig


class FedAdamConfig(FedOptConfig):
    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay")


class FedAdam(AdaptiveServerOptimizer):
    name = "fedadam"
    Config = FedAdamConfig
    config: FedAdamConfig

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return agg_math.adam_second_moment(v, delta, self.config.beta2)
