"""Privacy accounting with Google's `dp-accounting`: epsilon at the task's delta after each round.

Each round that releases a noised aggregate is one DP event: the Gaussian mechanism (central noise
on the plain path, `noise_multiplier` = noise std / clip norm), Poisson-subsampled when the round
samples its cohort from a larger population, or a zCDP bound (the distributed discrete Gaussian on
the secure path, noise.ddgauss_rho). The ledger composes them with the RDP accountant (both kinds
have exact RDP curves there) and answers the questions a round manager asks: epsilon so far, and
whether one more round still fits the task's budget. Units are client-level: neighbouring federations
differ in one device's whole contribution.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from edge_runtime.secagg.errors import PrivacyError

if TYPE_CHECKING:
    import dp_accounting

# dp_accounting (with scipy, mpmath, dm-tree) is imported where it is used: the aggregation registry
# imports this module, and a coordinator without DP tasks should not pay for it at start-up.

EventKind = Literal["gaussian", "zcdp"]


@dataclass(frozen=True)
class RoundEvent:
    """What one round released, in the terms the accountant needs (stored with the round)."""

    kind: EventKind
    noise_multiplier: float = 0.0  # gaussian: noise std / L2 sensitivity
    sampling_rate: float = 1.0  # gaussian: probability a device takes part (Poisson), 1 = everyone
    rho: float = 0.0  # zcdp

    def dp_event(self) -> dp_accounting.DpEvent:
        import dp_accounting

        if self.kind == "zcdp":
            return dp_accounting.ZCDpEvent(self.rho)
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate >= 1.0:
            return gaussian
        return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundEvent:
        try:
            event = cls(
                kind=data["kind"],
                noise_multiplier=float(data.get("noise_multiplier", 0.0)),
                sampling_rate=float(data.get("sampling_rate", 1.0)),
                rho=float(data.get("rho", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyError("FHAI-V609", f"a stored privacy event is malformed ({exc})") from exc
        if event.kind not in ("gaussian", "zcdp"):
            raise PrivacyError("FHAI-V609", f"unknown privacy event kind {event.kind!r}")
        return event


def epsilon_of(events: list[RoundEvent], delta: float) -> float:
    """Epsilon at `delta` of the composition of `events` (RDP accountant, dp-accounting's default orders)."""
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    for event, count in Counter(events).items():  # rounds repeat their settings: compose each kind once
        accountant.compose(event.dp_event(), count)
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """A task's privacy spending: the events of its rounds so far, against an (epsilon, delta) budget."""

    def __init__(self, epsilon_budget: float, delta: float, events: list[RoundEvent] | None = None) -> None:
        if not (epsilon_budget > 0 and 0 < delta < 1):
            raise PrivacyError(
                "FHAI-V609", f"a privacy budget needs epsilon > 0 and 0 < delta < 1, got ({epsilon_budget}, {delta})"
            )
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self.events = list(events or [])

    @property
    def epsilon(self) -> float:
        """Spent so far (0 before the first noised round)."""
        return epsilon_of(self.events, self.delta) if self.events else 0.0

    def allows(self, event: RoundEvent) -> bool:
        """Whether one more round releasing `event` keeps the task within its budget."""
        return epsilon_of([*self.events, event], self.delta) <= self.epsilon_budget

    def record(self, event: RoundEvent) -> float:
        """Add a round's event after checking it fits; the new epsilon. FHAI-V609 when it does not fit."""
        if not self.allows(event):
            raise PrivacyError(
                "FHAI-V609",
                f"one more round would spend more than the task's epsilon budget {self.epsilon_budget} at delta "
                f"{self.delta} (spent {self.epsilon:.3f} over {len(self.events)} rounds): the task must stop",
            )
        self.events.append(event)
        return self.epsilon


def noise_multiplier_for(epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0) -> float:
    """The least Gaussian noise multiplier whose `rounds` releases stay within (epsilon, delta)."""
    if not (epsilon > 0 and 0 < delta < 1 and rounds >= 1 and 0 < sampling_rate <= 1):
        raise PrivacyError("FHAI-V609", "calibration needs epsilon > 0, 0 < delta < 1, rounds >= 1, 0 < rate <= 1")
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    def event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(RoundEvent("gaussian", z, sampling_rate).dp_event(), rounds)

    return float(
        dp_accounting.calibrate_dp_mechanism(
            RdpAccountant, event, epsilon, delta, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4
        )
    )


def adaptive_clip_update_noise(noise_multiplier: float, count_stddev: float) -> float:
    """Noise multiplier left for the update when the clipped-count query takes its share.

    Andrew et al. 2021, Theorem 1: releasing the update sum with multiplier z_delta and the clipped
    count (sensitivity 1/2 after centring) with std sigma_b is one Gaussian release of multiplier
    z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2); solved for z_delta.
    """
    rest = noise_multiplier**-2 - (2.0 * count_stddev) ** -2
    if rest <= 0:
        raise PrivacyError(
            "FHAI-V609",
            f"count noise std {count_stddev} leaves no budget for the update at noise multiplier {noise_multiplier}: "
            "raise the count noise (e.g. to the expected cohort size / 20)",
        )
    return float(rest**-0.5)
