"""A device's model update for a secure round: clip -> rotate -> grid -> its share of DP noise -> ring.

The chain of the design's wrappers on the device side; the coordinator's side is
coordinator.privacy.secure_aggregate (unmask -> decode -> strategy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.secagg import grid, noise
from edge_runtime.secagg.grid import GridSpec


@dataclass(frozen=True)
class SecureUpdate:
    ring: np.ndarray  # uint32 residues mod 2^ring_bits, the input to the secure sum
    norm: float  # L2 norm before clipping (stays on the device; the clipped bit may be summed securely)
    clipped: bool
    coords_clipped: int
    noise_stddev: float  # this device's share, in grid steps


def secure_update(
    delta: np.ndarray, spec: GridSpec, rng: np.random.Generator, noise_sigma: float = 0.0
) -> SecureUpdate:
    """The ring vector a device masks: its quantized update plus N_Z(0, noise_sigma^2) per coordinate."""
    q = grid.quantize(delta, spec, rng)
    values = q.values
    if noise_sigma > 0:
        values = values + noise.sample_discrete_gaussian(noise_sigma, values.size, rng)
    return SecureUpdate(grid.to_ring(values, spec.ring_bits), q.norm, q.clipped, q.coords_clipped, noise_sigma)
