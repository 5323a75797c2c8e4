"""The arithmetic of aggregation, as functions of arrays: tests check each one against numpy or scipy.

Conventions: an update is a flat float32 delta from the global model; combined deltas and server
optimizer moments are float64 (sums of many float32 updates lose bits in float32, and float64 keeps
a resumed round within float32 rounding of the original whatever order the updates were folded in).
Robust statistics take `values` of shape (n_updates, n_params_in_chunk), like numpy's axis=0.

The two Numba kernels fold and measure one update in a single pass over it, which is what the
coordinator does once per received update; everything else runs once per round.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def fold_weighted(total: np.ndarray, delta: np.ndarray, weight: float) -> int:
    """Add weight * delta to the float64 running sum `total`, in place, unless delta has non-finite values.

    Returns the number of non-finite values in delta; when it is not 0, `total` is left untouched,
    so one bad update cannot poison a round's sum.
    """
    bad = 0
    for i in range(delta.size):
        bad += not np.isfinite(delta[i])
    if bad:
        return bad
    for i in range(delta.size):
        total[i] += weight * np.float64(delta[i])
    return 0


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def squared_norm(delta: np.ndarray) -> float:
    """Squared L2 norm of a float32 vector, accumulated in float64 (float32 overflows at |x| ~ 1e19).

    Reassociation lets the sum vectorize (4x faster); NaN and infinity still propagate.
    """
    s = 0.0
    for i in range(delta.size):
        x = np.float64(delta[i])
        s += x * x
    return s


def weighted_mean(total: np.ndarray, total_weight: float) -> np.ndarray:
    """The weighted mean delta from a running weighted sum and the sum of the weights."""
    return total / total_weight


def clip_factor(norm: float, max_norm: float) -> float:
    """Scale that brings an update of L2 norm `norm` within `max_norm` (1.0 when it already is)."""
    return 1.0 if norm <= max_norm else max_norm / norm


def sorted_per_parameter(values: np.ndarray) -> np.ndarray:
    """(n_updates, w) -> (w, n_updates) with each parameter's values sorted.

    One contiguous row per parameter: sorting contiguous float32 rows runs numpy's SIMD sort,
    several times faster than np.median/np.partition along axis 0 of the (n_updates, w) layout.
    """
    rows = np.array(np.asarray(values, dtype=np.float32).T, order="C", copy=True)  # never sort the caller's data
    rows.sort(axis=1)
    return rows


def median_of_sorted(rows: np.ndarray) -> np.ndarray:
    """Median of each sorted row, float64 (mean of the two middle values for an even count)."""
    k = rows.shape[1]
    mid = k // 2
    if k % 2:
        return rows[:, mid].astype(np.float64)
    return (rows[:, mid - 1].astype(np.float64) + rows[:, mid]) / 2.0


def n_trimmed(n_updates: int, beta: float) -> int:
    """How many values a trimmed mean drops at each end: int(beta * n), as scipy.stats.trim_mean."""
    return int(beta * n_updates)


def trimmed_mean_of_sorted(rows: np.ndarray, beta: float) -> np.ndarray:
    """Mean of each sorted row without its n_trimmed lowest and n_trimmed highest values, float64."""
    k = rows.shape[1]
    cut = n_trimmed(k, beta)
    kept = rows[:, cut : k - cut]
    return kept.sum(axis=1, dtype=np.float64) / kept.shape[1]


def coordinate_median(values: np.ndarray) -> np.ndarray:
    """Per-parameter median over updates (Yin et al. 2018): values (n_updates, w) -> float64 (w,)."""
    return median_of_sorted(sorted_per_parameter(values))


def trimmed_mean(values: np.ndarray, beta: float) -> np.ndarray:
    """Per-parameter mean over updates after dropping the int(beta*n) smallest and largest: -> float64 (w,)."""
    return trimmed_mean_of_sorted(sorted_per_parameter(values), beta)


# Server optimizers of Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2. The
# pseudo-gradient `delta` is the round's weighted mean update (a step direction, not a loss gradient),
# so the step adds it. No bias correction, as in the paper.


def first_moment(m: np.ndarray, delta: np.ndarray, beta1: float) -> np.ndarray:
    """m_t = beta1 * m_{t-1} + (1 - beta1) * delta."""
    return beta1 * m + (1.0 - beta1) * delta


def adam_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """v_t = beta2 * v_{t-1} + (1 - beta2) * delta^2."""
    return beta2 * v + (1.0 - beta2) * np.square(delta)


def yogi_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """v_t = v_{t-1} - (1 - beta2) * delta^2 * sign(v_{t-1} - delta^2): additive, so v moves slowly."""
    d2 = np.square(delta)
    return v - (1.0 - beta2) * d2 * np.sign(v - d2)


def adagrad_second_moment(v: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """v_t = v_{t-1} + delta^2."""
    return v + np.square(delta)


def adaptive_step(params: np.ndarray, m: np.ndarray, v: np.ndarray, server_lr: float, tau: float) -> np.ndarray:
    """x_{t+1} = x_t + server_lr * m_t / (sqrt(v_t) + tau), computed in float64, returned float32."""
    return (params.astype(np.float64) + server_lr * m / (np.sqrt(v) + tau)).astype(np.float32)


def apply_delta(params: np.ndarray, delta: np.ndarray, server_lr: float = 1.0) -> np.ndarray:
    """x_{t+1} = x_t + server_lr * delta, computed in float64, returned float32."""
    return (params.astype(np.float64) + server_lr * delta).astype(np.float32)
