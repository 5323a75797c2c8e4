"""The shared grid: every device of a round quantizes onto the same integers, so masked sums add up.

Per round the coordinator announces a `GridSpec` (clip norm C, per-device level bits b, cohort size n,
rotation seed). A device then:

1. clips its float update to L2 norm C;
2. pads it to D (a multiple of 256) and applies the seeded randomized Walsh-Hadamard rotation
   R = H·diag(signs)/sqrt(B) to each power-of-two piece B of D's binary expansion (33,153 parameters
   -> 32,768 + 512: padding to one power of two would cost up to 2x the bytes). R is orthonormal and
   spreads a piece's norm evenly over its coordinates: a rotated coordinate of a norm-C piece is
   about N(0, C^2/B) (Kairouz et al. 2021, DDGauss);
3. scales piece B by 1/step_B with step_B = c·C/(sqrt(B)·L), L = 2^(b-1) - 1 (a small piece gets a
   coarser grid, so even an update concentrated in it is not clipped), clips each coordinate to
   [-L, L] (one beyond c standard deviations: rare, counted) and rounds stochastically (unbiased);
4. optionally adds its share of integer DP noise (noise.py) and reduces mod 2^k.

No-wrap bound (the reason for k). Every device's integer coordinate lies in [-L, L], so the cohort's sum
of at most n devices lies in [-nL, nL]. The ring Z_{2^k}, read as the centred interval
[-2^(k-1), 2^(k-1) - 1], holds it exactly when nL <= 2^(k-1) - 1; `ring_bits_for` takes the least such
k, and the grid adds `guard_bits` (1) on top: then at least half the ring lies beyond any honest sum,
so an input off the grid (garbage) lands there in about half its coordinates and is caught. With DP noise the ring also holds `noise_bound` (a sub-Gaussian tail bound on the summed noise,
exceeded with probability <= 2^-40 per round, see noise.py). `test_grid.py` checks the bound at its
edge: n devices all at +L (and all at -L) decode exactly; one more level wraps.

The coordinator unmasks the sum in Z_{2^k}, lifts it to the centred interval, multiplies by step and
rotates back (R is its own inverse up to the sign diagonal): that is the sum of the quantized updates.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge_runtime.secagg.errors import PrivacyError

MAX_RING_BITS = 32  # masks are generated and added in uint32; every ring Z_{2^k} with k <= 32 divides it
MIN_LEVEL_BITS = 2
MAX_LEVEL_BITS = 24
DEFAULT_COORD_BOUND = 5.0  # c: rotated coordinates beyond c·C/sqrt(D) are clipped (P ~ 6e-7 each)


MIN_PIECE = 256  # smallest rotation piece: at most log2(D/256) + 1 pieces


def padded_size(n_params: int) -> int:
    """D: n_params rounded up to a multiple of MIN_PIECE (to a power of two below it)."""
    if n_params <= MIN_PIECE:
        return 1 << max(0, int(n_params - 1).bit_length())
    return -(-n_params // MIN_PIECE) * MIN_PIECE


def pieces(padded: int) -> tuple[int, ...]:
    """The powers of two of D's binary expansion, largest first: each is rotated on its own."""
    return tuple(1 << b for b in range(padded.bit_length() - 1, -1, -1) if padded >> b & 1)


def levels_for(bits: int) -> int:
    """L = 2^(bits-1) - 1: the largest integer level a device may send."""
    return (1 << (bits - 1)) - 1


def ring_bits_for(cohort: int, levels: int, noise_bound: int = 0) -> int:
    """Least k with cohort·levels + noise_bound <= 2^(k-1) - 1: the cohort's sum cannot wrap in Z_{2^k}."""
    span = cohort * levels + noise_bound
    return span.bit_length() + 1  # 2^(k-1) > span  <=>  k-1 >= bit_length(span)


@dataclass(frozen=True)
class GridSpec:
    """What the coordinator announces for one round's secure sum of model updates."""

    n_params: int
    clip_norm: float
    bits: int  # per-device level bits b
    cohort: int  # most devices whose inputs can enter the sum
    rotation_seed: bytes  # 32 public random bytes, fresh each round
    coord_bound: float = DEFAULT_COORD_BOUND
    noise_bound: int = 0  # integer range reserved for the summed DP noise
    guard_bits: int = 1  # ring bits beyond the no-wrap bound, so an off-grid input shows (grid.out_of_range)

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.n_params <= 1 << 26:
            problems.append(f"n_params {self.n_params} outside 1..2^26")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            problems.append(f"clip_norm {self.clip_norm} is not a positive number")
        if not MIN_LEVEL_BITS <= self.bits <= MAX_LEVEL_BITS:
            problems.append(f"bits {self.bits} outside {MIN_LEVEL_BITS}..{MAX_LEVEL_BITS}")
        if not 1 <= self.cohort <= 1 << 20:
            problems.append(f"cohort {self.cohort} outside 1..2^20")
        if len(self.rotation_seed) != 32:
            problems.append("rotation_seed must be 32 bytes")
        if not (math.isfinite(self.coord_bound) and self.coord_bound >= 1):
            problems.append(f"coord_bound {self.coord_bound} must be >= 1")
        if self.noise_bound < 0 or not 0 <= self.guard_bits <= 8:
            problems.append("noise_bound must be >= 0 and guard_bits 0..8")
        if not problems and self.ring_bits > MAX_RING_BITS:
            problems.append(
                f"the cohort's sum needs {self.ring_bits} bits (> {MAX_RING_BITS}): lower bits or the cohort size"
            )
        if problems:
            raise PrivacyError("FHAI-V601", "grid settings do not work together: " + "; ".join(problems))

    @property
    def padded(self) -> int:
        return padded_size(self.n_params)

    @property
    def levels(self) -> int:
        return levels_for(self.bits)

    @property
    def pieces(self) -> tuple[int, ...]:
        return pieces(self.padded)

    def piece_step(self, size: int) -> float:
        """Grid step of a rotated piece of `size` coordinates: c·C/sqrt(size) spans L levels."""
        return self.coord_bound * self.clip_norm / (math.sqrt(size) * self.levels)

    @property
    def step(self) -> float:
        """The finest step (the largest piece's): what the sensitivity of a device's integers is counted in."""
        return self.piece_step(self.pieces[0])

    def steps(self) -> np.ndarray:
        """Each rotated coordinate's grid step (float64, length D)."""
        return np.concatenate([np.full(size, self.piece_step(size)) for size in self.pieces])

    @property
    def ring_bits(self) -> int:
        return ring_bits_for(self.cohort, self.levels, self.noise_bound) + self.guard_bits

    @property
    def modulus(self) -> int:
        return 1 << self.ring_bits

    def to_dict(self) -> dict[str, Any]:
        """The announcement's msgpack-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridSpec:
        try:
            return cls(
                n_params=int(data["n_params"]),
                clip_norm=float(data["clip_norm"]),
                bits=int(data["bits"]),
                cohort=int(data["cohort"]),
                rotation_seed=bytes(data["rotation_seed"]),
                coord_bound=float(data.get("coord_bound", DEFAULT_COORD_BOUND)),
                noise_bound=int(data.get("noise_bound", 0)),
                guard_bits=int(data.get("guard_bits", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyError("FHAI-V601", f"grid announcement is malformed ({exc})") from exc


def rotation_signs(seed: bytes, size: int) -> np.ndarray:
    """The rotation's public random ±1 diagonal, from the round's seed (SHAKE-256, so any runtime agrees)."""
    bits = np.unpackbits(
        np.frombuffer(hashlib.shake_256(b"fhai grid signs v1" + seed).digest((size + 7) // 8), np.uint8)
    )
    return 1.0 - 2.0 * bits[:size].astype(np.float64)


def hadamard(x: np.ndarray) -> np.ndarray:
    """Unnormalised fast Walsh-Hadamard transform of a float64 vector whose length is a power of two."""
    y = np.array(x, dtype=np.float64, copy=True)
    n = y.size
    h = 1
    while h < n:
        pairs = y.reshape(-1, 2, h)
        a = pairs[:, 0, :].copy()
        pairs[:, 0, :] += pairs[:, 1, :]
        pairs[:, 1, :] = a - pairs[:, 1, :]
        h *= 2
    return y


def rotate(x: np.ndarray, spec: GridSpec) -> np.ndarray:
    """R x: per piece, H·diag(signs)·x_piece / sqrt(B), on the zero-padded vector. Orthonormal."""
    padded = np.zeros(spec.padded, dtype=np.float64)
    padded[: spec.n_params] = x
    padded *= rotation_signs(spec.rotation_seed, spec.padded)
    out = np.empty_like(padded)
    start = 0
    for size in spec.pieces:
        out[start : start + size] = hadamard(padded[start : start + size]) / math.sqrt(size)
        start += size
    return out


def unrotate(y: np.ndarray, spec: GridSpec) -> np.ndarray:
    """R^-1 y: per piece diag(signs)·H·y_piece / sqrt(B) (H·H = B·I), cut back to n_params."""
    y = np.asarray(y, dtype=np.float64)
    x = np.empty(spec.padded, dtype=np.float64)
    start = 0
    for size in spec.pieces:
        x[start : start + size] = hadamard(y[start : start + size]) / math.sqrt(size)
        start += size
    return (x * rotation_signs(spec.rotation_seed, spec.padded))[: spec.n_params]


def clip_to_norm(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """The float64 delta scaled to L2 norm <= clip_norm, and its norm before clipping."""
    x = np.asarray(delta, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise PrivacyError("FHAI-V602", "update has NaN or infinite values: the device's training diverged")
    return (x * (clip_norm / norm) if norm > clip_norm else x), norm


@dataclass(frozen=True)
class Quantized:
    """One device's update on the grid: centred integers in [-L, L] (int64, length D) and what it cost."""

    values: np.ndarray
    norm: float  # L2 norm before clipping
    clipped: bool  # whether the norm clip scaled it down
    coords_clipped: int  # rotated coordinates beyond c standard deviations, cut to ±L


def quantize(delta: np.ndarray, spec: GridSpec, rng: np.random.Generator) -> Quantized:
    """Clip, rotate, scale to grid steps and round stochastically (E[q] = the scaled coordinate)."""
    x = np.asarray(delta)
    if x.shape != (spec.n_params,):
        raise PrivacyError("FHAI-V602", f"update has shape {x.shape}, the grid is for ({spec.n_params},)")
    clipped, norm = clip_to_norm(x, spec.clip_norm)
    scaled = rotate(clipped, spec) / spec.steps()
    lim = float(spec.levels)
    coords_clipped = int(np.count_nonzero(np.abs(scaled) > lim))
    np.clip(scaled, -lim, lim, out=scaled)
    low = np.floor(scaled)
    q = low + (rng.random(scaled.size) < (scaled - low))
    return Quantized(q.astype(np.int64), norm, norm > spec.clip_norm, coords_clipped)


def to_ring(values: np.ndarray, ring_bits: int) -> np.ndarray:
    """Centred integers -> uint32 residues mod 2^ring_bits (two's complement, then masked)."""
    return (np.asarray(values, dtype=np.int64) & ((1 << ring_bits) - 1)).astype(np.uint32)


def from_ring(residues: np.ndarray, ring_bits: int) -> np.ndarray:
    """uint32 residues mod 2^ring_bits -> the centred integers in [-2^(k-1), 2^(k-1) - 1] (int64)."""
    r = np.asarray(residues, dtype=np.int64) & ((1 << ring_bits) - 1)
    return np.where(r >= 1 << (ring_bits - 1), r - (1 << ring_bits), r)


def out_of_range(total: np.ndarray, spec: GridSpec, contributors: int) -> int:
    """How many coordinates of a decoded sum lie beyond what `contributors` honest devices can reach.

    An honest sum lies within contributors·L + noise_bound; a coordinate beyond it is proof that some
    device sent values off the grid (a garbage or malicious input), since masks cancel exactly.
    """
    bound = contributors * spec.levels + spec.noise_bound
    return int(np.count_nonzero(np.abs(total) > bound))


def decode_sum(total: np.ndarray, spec: GridSpec) -> np.ndarray:
    """The float64 sum of the devices' (clipped, quantized) updates from the summed centred integers."""
    return unrotate(np.asarray(total, dtype=np.float64) * spec.steps(), spec)


def quantization_variance_bound(spec: GridSpec, contributors: int) -> float:
    """Bound on E||decoded sum - sum of clipped updates||^2 from stochastic rounding: n·sum_i step_i^2/4.

    Each rounded coordinate has variance frac·(1-frac)·step^2 <= step^2/4, independently; the rotation
    is orthonormal, so the squared error norm is the same before and after unrotating.
    """
    return contributors * float(np.sum(spec.steps() ** 2)) / 4.0


def max_influence(spec: GridSpec) -> float:
    """Largest L2 norm one device on the grid can add to the decoded sum: L·sqrt(sum_i step_i^2)."""
    return spec.levels * math.sqrt(float(np.sum(spec.steps() ** 2)))
