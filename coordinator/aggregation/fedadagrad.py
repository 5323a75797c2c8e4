"""FedAdagrad: v sums the squared pseudo-gradients, so steps shrink where updates were large."""

from __future__ import annotations

import numpy as np

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.fedopt import AdaptiveServerOptimizer, FedOptConfig


class FedAdagrad(AdaptiveServerOptimizer):
    name = "fedadagrad"
    Config = FedOptConfig

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return agg_math.adagrad_second_moment(v, delta)
