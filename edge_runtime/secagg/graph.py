"""Who masks with whom: the SecAgg+ communication graph, its degree and the Shamir threshold.

Bell et al. 2020 (SecAgg+) replace Bonawitz et al.'s complete graph by a sparse random graph of degree
k = O(log n): each device masks with and shares its secrets among its k neighbours only, so a device's
work and bytes grow with log n instead of n. We use a Harary graph (each node joined to the k/2 nodes
on either side in a ring) laid over a random order of the devices, the construction of the paper's
Section 4 (the order is public and comes from the coordinator's per-round seed).

Degree and threshold, `choose_graph`: with each neighbour independently corrupt (colluding with the
coordinator) with probability gamma and dropped with probability delta, we take the smallest even k and
a threshold t such that, over all n devices (union bound),
  - security:    n · P[Binomial(k, gamma) >= t] <= 2^-sigma   (no device's secrets reach t colluders),
  - correctness: n · P[Binomial(k, delta) > k - t] <= 2^-eta  (every device keeps t live neighbours),
the two tail conditions of the paper's Theorem 4.2 (sigma = 40, eta = 20 by default, as its tables use).
Cohorts small enough that k would reach n - 1 use the complete graph (Bonawitz et al.), with t chosen
deterministically: t > gamma·(n-1) colluders, and at least 2, can never rebuild a secret (one device
with the coordinator never can), and up to delta·n dropouts leave every device t live neighbours; a
cohort too small for both (3 or 4 devices at 30% dropouts) is refused, so the task lowers its
tolerated dropouts. This is the semi-honest setting of our threat model; a malicious
coordinator would also need 2t > k + colluders and signed survivor lists (not done here).
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass

import numpy as np

from edge_runtime.secagg.errors import PrivacyError

SECURITY_BITS = 40
CORRECTNESS_BITS = 20


@dataclass(frozen=True)
class GraphPlan:
    degree: int  # neighbours per device
    threshold: int  # Shamir shares needed to rebuild a device's secrets
    complete: bool


def choose_graph(
    n: int,
    corrupt_fraction: float = 0.1,
    dropout_fraction: float = 0.3,
    sigma: int = SECURITY_BITS,
    eta: int = CORRECTNESS_BITS,
) -> GraphPlan:
    """The degree and threshold for n devices (see the module's docstring for the two conditions)."""
    from scipy import stats  # the coordinator plans rounds; devices importing this module need not load scipy.stats

    if n < 3:
        raise PrivacyError(
            "FHAI-V601",
            "secure aggregation needs at least 3 devices: with 2, each learns the other's input from the sum",
        )
    if not (0 <= corrupt_fraction < 1 and 0 <= dropout_fraction < 1 and corrupt_fraction + dropout_fraction < 1):
        raise PrivacyError("FHAI-V601", "corrupt and dropout fractions must be in [0, 1) and sum to less than 1")
    log_n = math.log2(n)
    for k in range(4, n - 1, 2):
        # P[Bin(k, gamma) >= t] falls with t, P[Bin(k, delta) > k - t] rises: the least secure t is the best bet.
        t_range = np.arange(1, k + 1)
        secure = np.log2(np.maximum(stats.binom.sf(t_range - 1, k, corrupt_fraction), 1e-300)) + log_n <= -sigma
        if not secure.any():
            continue
        t = int(t_range[np.argmax(secure)])
        if math.log2(max(float(stats.binom.sf(k - t, k, dropout_fraction)), 1e-300)) + log_n <= -eta:
            return GraphPlan(k, t, complete=False)
    return complete_plan(n, corrupt_fraction, dropout_fraction)


def complete_plan(n: int, corrupt_fraction: float, dropout_fraction: float) -> GraphPlan:
    """Every device neighbours every other; t beats the colluders and survives the dropouts outright."""
    k = n - 1
    # Colluders among one's neighbours stay below t, and never one device alone (with the coordinator).
    t_min = max(2, math.floor(corrupt_fraction * k) + 1)
    t_max = k - math.ceil(dropout_fraction * n)  # a survivor's live neighbours after the worst dropouts
    if t_max < t_min:
        raise PrivacyError(
            "FHAI-V601",
            f"a cohort of {n} cannot tolerate {dropout_fraction:.0%} dropouts with {corrupt_fraction:.0%} colluding "
            "devices: enlarge the cohort or lower the tolerated fractions",
        )
    # A majority threshold where the dropouts allow it (harder to collude), else the most the dropouts allow.
    return GraphPlan(k, min(max(t_min, k // 2 + 1), t_max), complete=True)


def order(devices: list[str], seed: bytes) -> list[str]:
    """The devices in the round's public random order (HMAC-SHA256 of each id under the seed)."""
    return sorted(devices, key=lambda d: hmac.new(seed, d.encode(), "sha256").digest())


def neighbours(devices: list[str], seed: bytes, degree: int) -> dict[str, list[str]]:
    """Each device's neighbours in the Harary graph H(degree, n) over the seeded order."""
    ring = order(devices, seed)
    n = len(ring)
    if degree >= n - 1:
        return {d: [e for e in ring if e != d] for d in ring}
    half = degree // 2
    out: dict[str, list[str]] = {}
    for i, d in enumerate(ring):
        out[d] = [ring[(i + j) % n] for j in range(-half, half + 1) if j != 0]
    return out
