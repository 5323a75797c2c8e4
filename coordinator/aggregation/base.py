"""The two abstractions every strategy is built from.

An `UpdateAccumulator` receives one round's decoded updates one at a time and combines them into a
single delta; a `Strategy` says what devices train with, which accumulator a round uses, and how the
combined delta moves the global model (plus any server state that must survive a restart).

Wrappers such as clipping are strategies and accumulators around an inner one, not flags.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from coordinator.aggregation.errors import AggregationError
from coordinator.aggregation.state import StateDict, scalar

# How an update counts in a mean: by its number of training samples (FedAvg) or one vote per update.
Weighting = Literal["samples", "uniform"]


class StrategyConfig(BaseModel):
    """Options of one strategy, as the task YAML gives them next to `name`. Unknown options are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class UpdateAccumulator(ABC):
    """Folds a round's updates, one `add` at a time, into the combined delta `result()` returns."""

    kind: ClassVar[str]

    def __init__(self, n_params: int) -> None:
        self.n_params = int(n_params)
        self._closed = False

    @property
    @abstractmethod
    def count(self) -> int:
        """How many updates were added."""

    @property
    @abstractmethod
    def total_weight(self) -> float:
        """Sum of the weights (training samples) given to `add`, whatever the weighting policy."""

    @abstractmethod
    def add(self, delta: np.ndarray, weight: float) -> None:
        """Fold one update: a flat delta of n_params values from the global model, weighted by its n_samples."""

    @abstractmethod
    def result(self) -> np.ndarray:
        """The round's combined delta, float64 of shape (n_params,)."""

    def measurements(self) -> dict[str, float]:
        """What this accumulator did in the round (clipped count, noise std...), for the round's record."""
        return {"updates": float(self.count)}

    def close(self) -> None:
        """Release files and memory; the accumulator cannot be used afterwards."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise AggregationError("FHAI-A008", "this round's accumulator is closed: start a new one for the round")

    def _check_update(self, delta: np.ndarray, weight: float) -> tuple[np.ndarray, float]:
        """The delta as a contiguous float32 vector and the weight as a float, or AggregationError."""
        self._check_open()
        delta = np.ascontiguousarray(delta, dtype=np.float32)
        if delta.shape != (self.n_params,):
            raise AggregationError(
                "FHAI-A003",
                f"update has shape {delta.shape}, the model has ({self.n_params},) parameters: "
                "the device trained another model version; it must pull the current global model",
            )
        weight = float(weight)
        if not (np.isfinite(weight) and weight > 0):
            raise AggregationError(
                "FHAI-A005", f"update weight must be a positive number of training samples, got {weight}"
            )
        return delta, weight


def nonfinite_error(n_bad: int) -> AggregationError:
    return AggregationError(
        "FHAI-A004",
        f"update has {n_bad} NaN or infinite values and was not folded in: the device's training diverged "
        "(lower its learning rate) or the update was corrupted",
    )


Builder = Callable[[Mapping[str, Any] | str], "Strategy"]


class Strategy(ABC):
    """One aggregation strategy. Subclasses set `name` (the task YAML's `strategy.name`) and `Config`."""

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]]

    def __init__(self, config: StrategyConfig | None = None) -> None:
        self.config = self.Config() if config is None else config

    @classmethod
    def from_options(cls, options: Mapping[str, Any], build: Builder) -> Strategy:
        """Build from the task YAML's options (everything but `name`); `build` makes nested strategies."""
        return cls(validate_options(cls, options))

    def to_spec(self) -> dict[str, Any]:
        """The task YAML form of this strategy: `build_strategy(s.to_spec())` makes an equivalent one."""
        return {"name": self.name, **self.config.model_dump()}

    def client_config(self, round_number: int) -> dict[str, Any]:
        """Training-config overrides the round announcement carries to devices (TrainConfig field names)."""
        return {}

    @abstractmethod
    def new_accumulator(self, n_params: int, spill_dir: str | Path | None = None) -> UpdateAccumulator:
        """A fresh accumulator for one round. Strategies that keep every update spill them under `spill_dir`."""

    @abstractmethod
    def aggregate(self, global_params: np.ndarray, accumulator: UpdateAccumulator) -> np.ndarray:
        """The next global model (float32) from this round's accumulator; updates server state, if any."""

    def aggregate_measured(
        self, global_params: np.ndarray, accumulator: UpdateAccumulator
    ) -> tuple[np.ndarray, dict[str, float]]:
        """`aggregate` plus the measurements of the round (as TFF's aggregators and Flower's strategies return)."""
        params = self.aggregate(global_params, accumulator)
        return params, accumulator.measurements()

    def state_dict(self) -> StateDict:
        """Server state that must survive a coordinator restart, as arrays (see state.encode_state)."""
        return {"strategy": np.asarray(self.name)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back what `state_dict` returned (possibly after encode_state/decode_state)."""
        self._check_state_owner(state)

    def _check_state_owner(self, state: Mapping[str, np.ndarray]) -> None:
        owner = scalar(state, "strategy", str)
        if owner != self.name:
            raise AggregationError(
                "FHAI-A007",
                f"saved state belongs to strategy {owner!r}, not {self.name!r}: the task's strategy changed "
                "between runs; start the task's server state afresh or restore the original strategy",
            )

    def _check_round(self, global_params: np.ndarray, accumulator: UpdateAccumulator) -> np.ndarray:
        """The global parameters as float32, after checking they fit the accumulator and it holds updates."""
        params = np.asarray(global_params, dtype=np.float32)
        if params.shape != (accumulator.n_params,):
            raise AggregationError(
                "FHAI-A009",
                f"global parameters have shape {params.shape}, the round's accumulator was made for "
                f"({accumulator.n_params},)",
            )
        if accumulator.count == 0:
            raise AggregationError(
                "FHAI-A006", "no update was accepted in this round: keep the round open or lower its quorum"
            )
        return params


def validate_options(cls: type[Strategy], options: Mapping[str, Any]) -> StrategyConfig:
    """The strategy's config model from YAML options, or AggregationError listing what is wrong."""
    try:
        return cls.Config.model_validate(dict(options))
    except ValidationError as exc:
        allowed = ", ".join(cls.Config.model_fields) or "none"
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "options"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown option {where!r}")
            else:
                problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        raise AggregationError(
            "FHAI-A002",
            f"strategy {cls.name!r} has bad options: {'; '.join(problems)}. Options it accepts: {allowed}",
        ) from None
