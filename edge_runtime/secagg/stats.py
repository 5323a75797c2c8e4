"""Private statistics and evaluation traffic: integer count vectors for the secure sum, or, where a task
turns secure aggregation off, coarsened histograms with small-cell suppression and optional DP noise.

Everything a device sends about its patients is a count vector: feature-moment sums, score histograms
split by label. With secure aggregation they go through the same masked sum as model updates (a ring
wide enough for the cohort's total, `count_ring_bits`), so the coordinator sees pooled counts only.
Without it, `coarsen` + `suppress_small_cells` (+ `geometric_noise`) run on the device before the
histogram leaves: fewer, wider bins, no cell that singles out fewer than `min_count` patients.
"""

from __future__ import annotations

import math

import numpy as np

from edge_runtime.secagg.errors import PrivacyError
from edge_runtime.secagg.grid import ring_bits_for


def count_ring_bits(cohort: int, max_count: int) -> int:
    """Ring bits that hold the sum of `cohort` count vectors each entry <= max_count (no wrap, centred)."""
    return ring_bits_for(cohort, max_count)


def counts_to_ring(counts: np.ndarray, max_count: int, ring_bits: int) -> np.ndarray:
    """A device's non-negative integer counts as ring residues; refuses counts beyond the announced bound."""
    c = np.asarray(counts)
    if not np.issubdtype(c.dtype, np.integer) or c.ndim != 1:
        raise PrivacyError("FHAI-V602", "counts are a flat vector of integers")
    if c.size and (int(c.min()) < 0 or int(c.max()) > max_count):
        raise PrivacyError("FHAI-V602", f"counts must lie in 0..{max_count}, the bound the round announced")
    return (c.astype(np.int64) & ((1 << ring_bits) - 1)).astype(np.uint32)


def fixed_point(values: np.ndarray, scale: float, bound: float) -> np.ndarray:
    """Real-valued sums (e.g. a feature's sum over patients) on an integer grid: round(clip(x)/scale).

    Rounding is deterministic here: these are released as sums, not averaged over many rounds.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), -bound, bound)
    return np.rint(v / scale).astype(np.int64)


def first_pass(X: np.ndarray, scale: float, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Decision 0010, pass 1: per-column counts of finite values and fixed-point sums (each row clipped to ±bound)."""
    finite = np.isfinite(X)
    values = np.where(finite, np.clip(X, -bound, bound), 0.0)
    return finite.sum(axis=0).astype(np.int64), fixed_point(values.sum(axis=0), scale, bound * len(X))


def second_pass(X: np.ndarray, pooled_mean: np.ndarray, scale: float, bound: float) -> np.ndarray:
    """Decision 0010, pass 2: fixed-point sums of squared deviations from the pooled mean (rows clipped)."""
    finite = np.isfinite(X)
    dev = np.where(finite, np.clip(X, -bound, bound) - pooled_mean, 0.0)
    return fixed_point((dev * dev).sum(axis=0), scale, (2 * bound) ** 2 * len(X))


def coarsen(histogram: np.ndarray, factor: int) -> np.ndarray:
    """Merge each `factor` adjacent bins into one (the last bin takes what is left)."""
    h = np.asarray(histogram)
    if factor < 1:
        raise PrivacyError("FHAI-V609", f"coarsening factor must be >= 1, got {factor}")
    n_out = math.ceil(h.shape[-1] / factor)
    padded = np.zeros((*h.shape[:-1], n_out * factor), dtype=h.dtype)
    padded[..., : h.shape[-1]] = h
    return padded.reshape(*h.shape[:-1], n_out, factor).sum(axis=-1)


def suppress_small_cells(histogram: np.ndarray, min_count: int) -> tuple[np.ndarray, int]:
    """Zero every cell with 0 < count < min_count; returns the histogram and how many were suppressed.

    A suppressed cell is sent as 0, so the pooled histogram undercounts by at most min_count - 1 per
    suppressed cell; the count of suppressed cells travels with it so the reader knows.
    """
    h = np.array(histogram, copy=True)
    small = (h > 0) & (h < min_count)
    h[small] = 0
    return h, int(np.count_nonzero(small))


def geometric_noise(histogram: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """The two-sided geometric mechanism (Ghosh et al. 2009): epsilon-DP for a histogram where one
    patient changes one cell by 1 (L1 sensitivity 1). Noise P(k) ∝ exp(-epsilon·|k|), integer-valued."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyError("FHAI-V609", f"epsilon must be positive, got {epsilon}")
    h = np.asarray(histogram, dtype=np.int64)
    p = -math.expm1(-epsilon)
    noise = rng.geometric(p, h.shape).astype(np.int64) - rng.geometric(p, h.shape).astype(np.int64)
    return h + noise


def private_histogram(
    histogram: np.ndarray,
    factor: int,
    min_count: int,
    epsilon: float | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, int]]:
    """The plain-path release of an evaluation histogram: coarsen, noise (if epsilon), suppress small cells.

    Noise comes before suppression, so suppression only post-processes a DP release; suppressing the
    raw counts first would make which cells read 0 depend on single patients.
    """
    coarse = coarsen(histogram, factor)
    if epsilon is not None:
        coarse = geometric_noise(coarse, epsilon, rng)
    released, n_suppressed = suppress_small_cells(coarse, min_count)
    return released, {"bins": int(released.shape[-1]), "suppressed_cells": n_suppressed}
