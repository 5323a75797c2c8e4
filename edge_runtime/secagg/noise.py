"""Integer DP noise on the shared grid: each device adds its share of a distributed discrete Gaussian.

With secure aggregation nobody sees an un-noised update, so the noise must come from the devices:
each adds N_Z(0, sigma_dev^2) per coordinate (the discrete Gaussian, Canonne, Kamath & Steinke 2020)
to its integers before masking. The sum of m such draws is close to N_Z(0, m·sigma_dev^2), and
Kairouz, Liu & Steinke 2021 (DDGauss, Theorem 1) bound its privacy: the sum satisfies
(1/2)·eps^2-concentrated DP with

    eps = min( sqrt(Delta2^2/(m·sigma_dev^2) + 2·tau·D),  Delta2/(sqrt(m)·sigma_dev) + tau·sqrt(D) ),
    tau = 10 · sum_{k=1}^{m-1} exp(-2·pi^2·sigma_dev^2 · k/(k+1)),

for an L2 sensitivity Delta2 in grid units and D coordinates. Each device sizes its share for the
worst case the round tolerates, `min_contributors` (the Shamir threshold's survivors), so dropouts
above that only add noise. Sensitivity: a device's integers differ from its clipped, scaled update by
less than one step per coordinate, so Delta2 <= C/step + sqrt(D) (the deterministic bound; DDGauss's
conditional rounding gives a tighter one).
"""

from __future__ import annotations

import math

import numpy as np

from edge_runtime.secagg.errors import PrivacyError

WRAP_PROBABILITY_BITS = 40


def sample_discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """size draws of N_Z(0, sigma^2): P(x) ∝ exp(-x^2 / (2 sigma^2)) on the integers (int64).

    Algorithm 3 of Canonne, Kamath & Steinke 2020, vectorised: propose from the discrete Laplace with
    scale t = floor(sigma) + 1 (a difference of two geometric draws) and accept y with probability
    exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)); the acceptance rate is above 0.5 for sigma >= 1.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise PrivacyError("FHAI-V609", f"discrete Gaussian sigma must be positive, got {sigma}")
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # geometric success probability: P(Y=y) ∝ exp(-|y|/t)
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        want = max(64, int((size - filled) * 2.2))
        y = rng.geometric(p, want).astype(np.int64) - rng.geometric(p, want).astype(np.int64)
        accept = rng.random(want) < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2 * sigma * sigma))
        take = y[accept][: size - filled]
        out[filled : filled + take.size] = take
        filled += take.size
    return out


def tau(sigma_dev: float, contributors: int) -> float:
    """DDGauss's tau: how far a sum of discrete Gaussians is from one discrete Gaussian."""
    k = np.arange(1, contributors, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * sigma_dev**2 * k / (k + 1)).sum())


def ddgauss_epsilon(delta2: float, sigma_dev: float, contributors: int, dimension: int) -> float:
    """The eps of DDGauss Theorem 1: the round is (eps^2 / 2)-zCDP."""
    tv = tau(sigma_dev, contributors)
    a = math.sqrt(delta2**2 / (contributors * sigma_dev**2) + 2.0 * tv * dimension)
    b = delta2 / (math.sqrt(contributors) * sigma_dev) + tv * math.sqrt(dimension)
    return min(a, b)


def ddgauss_rho(delta2: float, sigma_dev: float, contributors: int, dimension: int) -> float:
    """zCDP rho of one round of the distributed discrete Gaussian (for dp-accounting's ZCDpEvent)."""
    return ddgauss_epsilon(delta2, sigma_dev, contributors, dimension) ** 2 / 2.0


def grid_sensitivity(clip_norm: float, step: float, dimension: int) -> float:
    """L2 sensitivity of one device's integers: the clipped norm in steps, plus < 1 per coordinate."""
    return clip_norm / step + math.sqrt(dimension)


def device_sigma(noise_multiplier: float, delta2: float, min_contributors: int) -> float:
    """Each device's share so that min_contributors shares sum to std noise_multiplier·Delta2."""
    if noise_multiplier <= 0 or min_contributors < 1:
        raise PrivacyError("FHAI-V609", "noise multiplier and contributors must be positive")
    return noise_multiplier * delta2 / math.sqrt(min_contributors)


def noise_bound(sigma_dev: float, contributors: int, dimension: int, bits: int = WRAP_PROBABILITY_BITS) -> int:
    """Integer bound the summed noise of a round stays within, except with probability <= 2^-bits.

    The discrete Gaussian is sub-Gaussian with variance proxy sigma^2 (Canonne et al. 2020, Cor. 9), so
    a sum of m draws exceeds s in magnitude with probability <= 2·exp(-s^2 / (2 m sigma^2)); a union
    bound over D coordinates gives s = sigma·sqrt(2 m · ln(2 D 2^bits)).
    """
    return math.ceil(sigma_dev * math.sqrt(2.0 * contributors * (math.log(2 * dimension) + bits * math.log(2))))
