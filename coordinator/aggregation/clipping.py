"""Norm clipping as a wrapper: each update is scaled to L2 norm <= max_norm before the inner strategy sees it.

Bounds how far any one device can move the model (a prerequisite of differential privacy, and a
cheap defence against a broken or hostile device) without changing the inner strategy:
`clipped(FedAdam(), max_norm=5.0)`, or in the task YAML
`strategy: {name: clipped, max_norm: 5.0, inner: {name: fedadam, server_lr: 0.01}}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.base import (
    Builder,
    Strategy,
    StrategyConfig,
    UpdateAccumulator,
    nonfinite_error,
    validate_options,
)
from coordinator.aggregation.errors import AggregationError
from coordinator.aggregation.state import StateDict


class ClippedConfig(StrategyConfig):
    max_norm: float = Field(gt=0, description="largest L2 norm an update keeps")
    inner: dict[str, Any] | str = Field("fedavg", description="the wrapped strategy, as its own YAML spec")
    max_weight: float | None = Field(
        None, gt=0, description="cap on an update's weight (its claimed samples), so no device dominates the mean"
    )


class ClippingAccumulator(UpdateAccumulator):
    """Scales each update down to `max_norm` (direction kept), then hands it to the inner accumulator."""

    kind = "clipped"

    def __init__(self, inner: UpdateAccumulator, max_norm: float, max_weight: float | None = None) -> None:
        super().__init__(inner.n_params)
        self.inner = inner
        self.max_norm = float(max_norm)
        self.max_weight = max_weight
        self.n_clipped = 0  # how many updates of the round were scaled down, for the round's report
        self.n_capped = 0  # how many claimed more samples than max_weight

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight

    def add(self, delta: np.ndarray, weight: float) -> None:
        delta, weight = self._check_update(delta, weight)
        norm = float(np.sqrt(agg_math.squared_norm(delta)))
        if not np.isfinite(norm):
            raise nonfinite_error(int(np.count_nonzero(~np.isfinite(delta))))
        factor = agg_math.clip_factor(norm, self.max_norm)
        if factor < 1.0:
            delta = delta * np.float32(factor)
        capped = self.max_weight is not None and weight > self.max_weight
        self.inner.add(delta, min(weight, self.max_weight) if self.max_weight is not None else weight)
        self.n_clipped += factor < 1.0
        self.n_capped += capped

    def measurements(self) -> dict[str, float]:
        return {
            **self.inner.measurements(),
            "clip_norm": self.max_norm,
            "clipped": float(self.n_clipped),
            "weights_capped": float(self.n_capped),
        }

    def result(self) -> np.ndarray:
        self._check_open()
        return self.inner.result()

    def close(self) -> None:
        self.inner.close()
        super().close()


class Clipped(Strategy):
    """Any strategy, with every update's L2 norm clipped to `max_norm` before it is folded in."""

    name = "clipped"
    Config = ClippedConfig
    config: ClippedConfig

    def __init__(self, config: StrategyConfig | None, inner: Strategy) -> None:
        if config is None:
            raise AggregationError("FHAI-A002", "strategy 'clipped' needs its max_norm option")
        super().__init__(config)
        self.inner = inner

    @classmethod
    def from_options(cls, options: Mapping[str, Any], build: Builder) -> Strategy:
        config = validate_options(cls, options)
        assert isinstance(config, ClippedConfig)
        return cls(config, build(config.inner))

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "max_norm": self.config.max_norm, "inner": self.inner.to_spec()}
        if self.config.max_weight is not None:
            spec["max_weight"] = self.config.max_weight
        return spec

    def client_config(self, round_number: int) -> dict[str, Any]:
        return self.inner.client_config(round_number)

    def new_accumulator(self, n_params: int, spill_dir: str | Path | None = None) -> UpdateAccumulator:
        return ClippingAccumulator(
            self.inner.new_accumulator(n_params, spill_dir), self.config.max_norm, self.config.max_weight
        )

    def aggregate(self, global_params: np.ndarray, accumulator: UpdateAccumulator) -> np.ndarray:
        if not isinstance(accumulator, ClippingAccumulator):
            raise AggregationError(
                "FHAI-A008", "a clipped strategy aggregates only accumulators made by its own new_accumulator"
            )
        return self.inner.aggregate(global_params, accumulator.inner)

    def state_dict(self) -> StateDict:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state_dict(state)


def clipped(inner: Strategy, max_norm: float, max_weight: float | None = None) -> Clipped:
    """`inner` with each update clipped to L2 norm `max_norm` (TFF's clipping factory, as a wrapper),
    and, with `max_weight`, no update weighing more than that many samples."""
    options: dict[str, Any] = {"max_norm": max_norm, "inner": inner.to_spec(), "max_weight": max_weight}
    return Clipped(validate_options(Clipped, options), inner)
