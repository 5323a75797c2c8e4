"""What the coordinator announces for one secure round: the grid, the graph, each device's noise share.

`plan_secure_round` turns the task's settings (clip norm, grid bits, cohort, tolerated dropout and
collusion, an optional DP noise multiplier) into the announcement's pieces and the round's DP event:

- the graph and Shamir threshold t (graph.choose_graph);
- with DP, each device's discrete-Gaussian share sigma_dev = z·Delta2/sqrt(t): even if only t devices'
  noise reaches the sum, it has std z·Delta2 (more survivors only add noise), and the round is one
  zCDP event with DDGauss's rho for t contributors;
- the grid, whose ring also holds the cohort's summed noise (noise.noise_bound).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from coordinator.privacy.accounting import RoundEvent
from edge_runtime.secagg import graph, noise
from edge_runtime.secagg.grid import GridSpec


@dataclass(frozen=True)
class SecureRoundPlan:
    grid: GridSpec
    graph: graph.GraphPlan
    graph_seed: bytes
    noise_sigma: float  # each device's share, in grid steps (0: no DP)
    event: RoundEvent | None  # what the round costs in privacy (None: no DP)


def plan_secure_round(
    n_params: int,
    clip_norm: float,
    bits: int,
    cohort: int,
    noise_multiplier: float | None = None,
    corrupt_fraction: float = 0.1,
    dropout_fraction: float = 0.3,
) -> SecureRoundPlan:
    plan = graph.choose_graph(cohort, corrupt_fraction, dropout_fraction)
    seed = os.urandom(32)
    base = GridSpec(n_params, clip_norm, bits, cohort, seed)
    if not noise_multiplier:
        return SecureRoundPlan(base, plan, os.urandom(32), 0.0, None)
    # The fewest devices whose inputs (and noise) can be in an unmasked sum: every survivor keeps t
    # live neighbours, so a sum has at least t + 1 contributors; t is the conservative count.
    min_contributors = plan.threshold
    delta2 = noise.grid_sensitivity(clip_norm, base.step, base.padded)
    sigma = noise.device_sigma(noise_multiplier, delta2, min_contributors)
    bound = noise.noise_bound(sigma, cohort, base.padded)
    spec = GridSpec(n_params, clip_norm, bits, cohort, seed, noise_bound=bound)
    rho = noise.ddgauss_rho(delta2, sigma, min_contributors, spec.padded)
    return SecureRoundPlan(spec, plan, os.urandom(32), sigma, RoundEvent("zcdp", rho=rho))
