"""Strategies by name: the task YAML's `strategy:` section becomes a Strategy here, and nowhere else.

A new strategy is a new small module plus one entry in STRATEGIES.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coordinator.aggregation.base import Strategy
from coordinator.aggregation.clipping import Clipped
from coordinator.aggregation.dp import DPFedAvg
from coordinator.aggregation.errors import AggregationError
from coordinator.aggregation.fedadagrad import FedAdagrad
from coordinator.aggregation.fedadam import FedAdam
from coordinator.aggregation.fedavg import FedAvg
from coordinator.aggregation.fedprox import FedProx
from coordinator.aggregation.fedyogi import FedYogi
from coordinator.aggregation.median import CoordinateMedian
from coordinator.aggregation.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, CoordinateMedian, TrimmedMean, Clipped, DPFedAvg)
}


def build_strategy(spec: Mapping[str, Any] | str) -> Strategy:
    """A strategy from its task YAML spec: `{name: fedadam, server_lr: 0.01}`, or just a name (`fedavg`).

    Raises AggregationError FHAI-A001 for an unknown name, FHAI-A002 for a bad or unknown option.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise AggregationError(
            "FHAI-A002", f"a strategy is given as a mapping with a 'name' (e.g. {{name: fedavg}}), got {spec!r}"
        )
    options = dict(spec)
    name = options.pop("name", None)
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise AggregationError(
            "FHAI-A001",
            f"unknown aggregation strategy {name!r}: set the task's strategy.name to one of {', '.join(STRATEGIES)}",
        )
    return cls.from_options(options, build_strategy)
