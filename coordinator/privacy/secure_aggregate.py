"""From an unmasked secure sum to what a strategy consumes: decode, check the range, average.

The coordinator never holds an individual update here: `SecureSumAccumulator` takes the round's one
decoded sum and its number of contributors, and mean-based strategies (FedAvg, FedAdam...) step with
`result()` as they would with a MeanAccumulator (unweighted: each device counts once).
"""

from __future__ import annotations

import numpy as np

from coordinator.aggregation.base import UpdateAccumulator
from coordinator.aggregation.errors import AggregationError
from edge_runtime.secagg import grid
from edge_runtime.secagg.errors import PrivacyError
from edge_runtime.secagg.grid import GridSpec


def decode_secure_sum(residues: np.ndarray, spec: GridSpec, contributors: int) -> tuple[np.ndarray, dict[str, float]]:
    """The float64 sum of the contributors' updates, and measurements; FHAI-V608 on an off-grid sum.

    Masks cancel exactly, so an honest round's integers lie within contributors·L + noise_bound; a
    coordinate beyond proves that some device sent values off the grid. That is detected here, not
    attributed (the inputs are hidden): the round's sum is refused. A device that stays on the grid
    but sends ±L everywhere moves the sum by an L2 norm of at most L·sqrt(sum of step^2), about
    c·C·sqrt(pieces) (a few times the clip norm): bounded, reported as `max_device_influence`.
    """
    centred = grid.from_ring(residues, spec.ring_bits)
    off = grid.out_of_range(centred, spec, contributors)
    if off:
        raise PrivacyError(
            "FHAI-V608",
            f"the unmasked sum has {off} coordinates beyond what {contributors} devices on the grid can reach: "
            "a device sent an input off the grid (garbage or malicious); the round's sum is refused",
        )
    total = grid.decode_sum(centred, spec)
    return total, {
        "contributors": float(contributors),
        "sum_norm": float(np.linalg.norm(total)),
        "max_device_influence": grid.max_influence(spec),
    }


class SecureSumAccumulator(UpdateAccumulator):
    """Holds one round's decoded secure sum; `result()` is the unweighted mean over its contributors."""

    kind = "secure_sum"

    def __init__(self, n_params: int) -> None:
        super().__init__(n_params)
        self._sum: np.ndarray | None = None
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return float(self._count)

    def add(self, delta: np.ndarray, weight: float) -> None:
        raise AggregationError(
            "FHAI-A008", "a secure round has no individual updates: give its unmasked sum to add_sum()"
        )

    def add_sum(self, total: np.ndarray, contributors: int) -> None:
        self._check_open()
        if self._sum is not None:
            raise AggregationError("FHAI-A008", "a secure round has one sum")
        total = np.asarray(total, dtype=np.float64)
        if total.shape != (self.n_params,) or contributors < 1:
            raise AggregationError("FHAI-A003", f"secure sum of shape {total.shape} for {contributors} devices")
        self._sum, self._count = total, int(contributors)

    def result(self) -> np.ndarray:
        self._check_open()
        if self._sum is None:
            raise AggregationError("FHAI-A006", "no secure sum was unmasked in this round")
        return self._sum / self._count
