"""Adaptive server optimizers (Reddi et al. 2021): the round's weighted mean update is a pseudo-gradient.

FedAdam, FedYogi and FedAdagrad differ only in how the second moment v follows it; this module holds
what they share: the moments as server state, kept in float64 and saved with `state_dict`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydantic import Field

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.accumulators import MeanAccumulator
from coordinator.aggregation.base import Strategy, StrategyConfig, UpdateAccumulator, Weighting
from coordinator.aggregation.errors import AggregationError
from coordinator.aggregation.state import StateDict, scalar


class FedOptConfig(StrategyConfig):
    weighting: Weighting = "samples"
    server_lr: float = Field(0.01, gt=0, le=10, description="eta, the server step size")
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay")
    tau: float = Field(1e-3, gt=0, le=1, description="adaptivity: larger tau, less adaptive steps")


class AdaptiveServerOptimizer(Strategy):
    """x += server_lr * m / (sqrt(v) + tau), with m the momentum of the pseudo-gradient and v per subclass.

    m starts at 0 and v at tau^2 (the paper's v_{-1} >= tau^2), when the first round's size is known.
    """

    config: FedOptConfig

    def __init__(self, config: StrategyConfig | None = None) -> None:
        super().__init__(config)
        self._m: np.ndarray | None = None
        self._v: np.ndarray | None = None
        self._rounds = 0

    @abstractmethod
    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """v_t from v_{t-1} and the pseudo-gradient."""

    def new_accumulator(self, n_params: int, spill_dir: str | Path | None = None) -> UpdateAccumulator:
        return MeanAccumulator(n_params, self.config.weighting)

    def aggregate(self, global_params: np.ndarray, accumulator: UpdateAccumulator) -> np.ndarray:
        params = self._check_round(global_params, accumulator)
        delta = accumulator.result()
        m, v = self._moments(params.size)
        m = agg_math.first_moment(m, delta, self.config.beta1)
        v = self.second_moment(v, delta)
        new_params = agg_math.adaptive_step(params, m, v, self.config.server_lr, self.config.tau)
        self._m, self._v, self._rounds = m, v, self._rounds + 1
        return new_params

    def state_dict(self) -> StateDict:
        state = super().state_dict()
        state["rounds"] = np.asarray(self._rounds, dtype=np.int64)
        if self._m is not None and self._v is not None:
            state["m"] = self._m.copy()
            state["v"] = self._v.copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._check_state_owner(state)
        rounds = scalar(state, "rounds", int)
        m, v = state.get("m"), state.get("v")
        if (m is None) != (v is None):
            raise AggregationError("FHAI-A007", f"saved {self.name} state has only one of its two moments")
        if m is not None and v is not None:
            m = np.asarray(m, dtype=np.float64)
            v = np.asarray(v, dtype=np.float64)
            if m.ndim != 1 or m.shape != v.shape:
                raise AggregationError("FHAI-A007", f"saved {self.name} moments have shapes {m.shape} and {v.shape}")
            m, v = m.copy(), v.copy()
        self._m, self._v, self._rounds = m, v, rounds

    def _moments(self, n_params: int) -> tuple[np.ndarray, np.ndarray]:
        if self._m is None or self._v is None:
            return np.zeros(n_params), np.full(n_params, self.config.tau**2)
        if self._m.shape != (n_params,):
            raise AggregationError(
                "FHAI-A007",
                f"{self.name} server state is for {self._m.size} parameters, the model has {n_params}: "
                "the task's model changed; start its server state afresh",
            )
        return self._m, self._v
