"""Client-level DP-FedAvg as a wrapper (McMahan et al. 2018): clip, average unweighted, add Gaussian noise.

`{name: dp, noise_multiplier: 1.1, clip: 1.0, inner: fedavg}` clips each update to L2 norm `clip`,
averages them with equal weight (a device's claimed sample count cannot buy it more influence, and a
client-level sensitivity needs it), adds N(0, (z·clip)^2) to the sum, then hands the noised mean to
the inner strategy (FedAvg, FedAdam, ...: any mean-based one), which moves the model as usual.

`clip: adaptive` follows Andrew et al. 2021: the clip norm tracks the `target_quantile` of the update
norms, C <- C·exp(-lr·(b - target)), where b is the noised fraction of updates that were not clipped
(noise std `count_stddev` on the count); the count's privacy cost is paid from the same noise
multiplier (accounting.adaptive_clip_update_noise). The clip norm is server state: it survives a restart.

This is the plain path: the coordinator sees the updates and adds the noise (central DP, trusting the
coordinator). With secure aggregation the devices clip and add their share of integer noise on the
shared grid (edge_runtime.secagg.noise) and the coordinator only sees the noised sum.
Each round's `round_event()` is what the task's PrivacyLedger records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.accumulators import MeanAccumulator
from coordinator.aggregation.base import Builder, Strategy, StrategyConfig, UpdateAccumulator, validate_options
from coordinator.aggregation.errors import AggregationError
from coordinator.aggregation.state import StateDict, scalar
from coordinator.privacy.accounting import RoundEvent, adaptive_clip_update_noise


class DPConfig(StrategyConfig):
    noise_multiplier: float = Field(gt=0, le=100, description="noise std on the sum / clip norm")
    clip: float | Literal["adaptive"] = Field(description="L2 clip norm of an update, or 'adaptive'")
    inner: dict[str, Any] | str = Field("fedavg", description="mean-based strategy that applies the noised mean")
    initial_clip: float = Field(0.1, gt=0, description="adaptive: the first round's clip norm")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: fraction of updates left unclipped")
    clip_learning_rate: float = Field(0.2, gt=0, le=5, description="adaptive: geometric step of the clip norm")
    count_stddev: float | None = Field(None, gt=0, description="adaptive: noise std on the unclipped count")
    seed: int | None = Field(None, description="noise seed, for reproducible tests only (None: OS entropy)")


class DPAccumulator(UpdateAccumulator):
    """Clips each update to `clip`, folds it with weight 1, and noises the round's mean once."""

    kind = "dp"

    def __init__(self, inner: MeanAccumulator, clip: float, update_noise: float, rng: np.random.Generator) -> None:
        super().__init__(inner.n_params)
        self.inner = inner
        self.clip = float(clip)
        self.update_noise = float(update_noise)  # noise multiplier of the update sum
        self._rng = rng
        self.n_clipped = 0
        self._noised: np.ndarray | None = None

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight

    def add(self, delta: np.ndarray, weight: float) -> None:
        delta, weight = self._check_update(delta, weight)
        factor = agg_math.clip_factor(float(np.sqrt(agg_math.squared_norm(delta))), self.clip)
        self.inner.add(delta * np.float32(factor) if factor < 1.0 else delta, 1.0)
        self.n_clipped += factor < 1.0
        self._noised = None

    @property
    def noise_stddev(self) -> float:
        """Std of the Gaussian noise on the sum of clipped updates."""
        return self.update_noise * self.clip

    def result(self) -> np.ndarray:
        """The noised unweighted mean: (sum of clipped updates + N(0, (z·C)^2 I)) / count. Drawn once."""
        self._check_open()
        if self._noised is None:
            mean = self.inner.result()
            self._noised = mean + self._rng.normal(0.0, self.noise_stddev, self.n_params) / self.count
        return self._noised

    def measurements(self) -> dict[str, float]:
        return {
            **self.inner.measurements(),
            "clip_norm": self.clip,
            "clipped": float(self.n_clipped),
            "noise_stddev": self.noise_stddev,
        }

    def close(self) -> None:
        self.inner.close()
        super().close()


class DPFedAvg(Strategy):
    """Clip -> unweighted mean -> Gaussian noise -> the inner strategy's step; adaptive clip optional."""

    name = "dp"
    Config = DPConfig
    config: DPConfig

    def __init__(self, config: StrategyConfig | None, inner: Strategy) -> None:
        if config is None:
            raise AggregationError("FHAI-A002", "strategy 'dp' needs its noise_multiplier and clip options")
        super().__init__(config)
        self.inner = inner
        self._rng = np.random.default_rng(self.config.seed)
        clip = self.config.clip
        self.clip_norm = self.config.initial_clip if clip == "adaptive" else float(clip)

    @property
    def adaptive(self) -> bool:
        return self.config.clip == "adaptive"

    @classmethod
    def from_options(cls, options: Mapping[str, Any], build: Builder) -> Strategy:
        config = validate_options(cls, options)
        assert isinstance(config, DPConfig)
        return cls(config, build(config.inner))

    def to_spec(self) -> dict[str, Any]:
        return {**self.config.model_dump(exclude_none=True), "name": self.name, "inner": self.inner.to_spec()}

    def client_config(self, round_number: int) -> dict[str, Any]:
        return self.inner.client_config(round_number)

    def count_stddev(self, n_updates: int) -> float:
        """Noise std on the unclipped count: the option, or n/20 (Andrew et al.'s recommendation)."""
        return self.config.count_stddev if self.config.count_stddev is not None else max(n_updates, 1) / 20.0

    def update_noise(self, expected_updates: int) -> float:
        z = self.config.noise_multiplier
        return adaptive_clip_update_noise(z, self.count_stddev(expected_updates)) if self.adaptive else z

    def new_accumulator(self, n_params: int, spill_dir: str | Path | None = None) -> UpdateAccumulator:
        inner = self.inner.new_accumulator(n_params, spill_dir)
        if not isinstance(inner, MeanAccumulator):
            inner.close()
            raise AggregationError(
                "FHAI-A002", f"strategy 'dp' needs a mean-based inner strategy, not {self.inner.name!r}"
            )
        # The update's share of the noise is fixed before the round; the count noise uses the same n later.
        return DPAccumulator(
            MeanAccumulator(n_params, "uniform"), self.clip_norm, self.config.noise_multiplier, self._rng
        )

    def aggregate(self, global_params: np.ndarray, accumulator: UpdateAccumulator) -> np.ndarray:
        return self.aggregate_measured(global_params, accumulator)[0]

    def aggregate_measured(
        self, global_params: np.ndarray, accumulator: UpdateAccumulator
    ) -> tuple[np.ndarray, dict[str, float]]:
        if not isinstance(accumulator, DPAccumulator):
            raise AggregationError(
                "FHAI-A008", "a dp strategy aggregates only accumulators made by its new_accumulator"
            )
        self._check_round(global_params, accumulator)
        if self.adaptive:
            accumulator.update_noise = self.update_noise(accumulator.count)
            accumulator._noised = None
        params = self.inner.aggregate(global_params, accumulator)
        measurements = accumulator.measurements()
        if self.adaptive:
            n = accumulator.count
            unclipped = n - accumulator.n_clipped + self._rng.normal(0.0, self.count_stddev(n))
            fraction = unclipped / n
            self.clip_norm *= math.exp(-self.config.clip_learning_rate * (fraction - self.config.target_quantile))
            measurements |= {"unclipped_fraction_noised": fraction, "next_clip_norm": self.clip_norm}
        return params, measurements

    def round_event(self) -> RoundEvent:
        """The DP event of one round of this strategy (the total multiplier covers the count query too)."""
        return RoundEvent("gaussian", self.config.noise_multiplier)

    def state_dict(self) -> StateDict:
        return {**self.inner.state_dict(), "dp_clip_norm": np.asarray(self.clip_norm)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        inner = {k: v for k, v in state.items() if k != "dp_clip_norm"}
        self.inner.load_state_dict(inner)
        if "dp_clip_norm" in state:
            self.clip_norm = scalar(state, "dp_clip_norm", float)
