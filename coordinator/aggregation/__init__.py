"""Aggregation strategies of the coordinator: one small module per strategy behind `Strategy`.

Per round: `acc = strategy.new_accumulator(n_params, spill_dir)`, `acc.add(delta, n_samples)` for each
accepted update, then `new_params = strategy.aggregate(global_params, acc)` and `acc.close()`.
Strategies come from the task YAML through `build_strategy({"name": "fedadam", "server_lr": 0.01})`.
"""

from __future__ import annotations

from coordinator.aggregation.accumulators import MeanAccumulator, SpillAccumulator
from coordinator.aggregation.base import Strategy, StrategyConfig, UpdateAccumulator, Weighting
from coordinator.aggregation.clipping import Clipped, ClippingAccumulator, clipped
from coordinator.aggregation.dp import DPAccumulator, DPFedAvg
from coordinator.aggregation.errors import AggregationError
from coordinator.aggregation.fedadagrad import FedAdagrad
from coordinator.aggregation.fedadam import FedAdam
from coordinator.aggregation.fedavg import FedAvg
from coordinator.aggregation.fedprox import FedProx
from coordinator.aggregation.fedyogi import FedYogi
from coordinator.aggregation.median import CoordinateMedian
from coordinator.aggregation.registry import STRATEGIES, build_strategy
from coordinator.aggregation.state import decode_state, encode_state
from coordinator.aggregation.trimmed_mean import TrimmedMean

__all__ = [
    "STRATEGIES",
    "AggregationError",
    "Clipped",
    "ClippingAccumulator",
    "CoordinateMedian",
    "DPAccumulator",
    "DPFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "MeanAccumulator",
    "SpillAccumulator",
    "Strategy",
    "StrategyConfig",
    "TrimmedMean",
    "UpdateAccumulator",
    "Weighting",
    "build_strategy",
    "clipped",
    "decode_state",
    "encode_state",
]
