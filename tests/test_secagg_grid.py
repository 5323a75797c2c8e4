"""The shared grid, Shamir sharing and private statistics against independent references (scipy, numpy)."""

from __future__ import annotations

import os
from itertools import combinations

import numpy as np
import pytest
from scipy.linalg import hadamard as scipy_hadamard

from edge_runtime.secagg import grid, shamir, stats
from edge_runtime.secagg.errors import PrivacyError
from edge_runtime.secagg.grid import GridSpec
from edge_runtime.secagg.messages import pack_bits, unpack_bits

SEED = bytes(range(32))


def test_hadamard_matches_scipy_and_rotation_is_orthonormal() -> None:
    x = np.random.default_rng(0).standard_normal(64)
    assert np.allclose(grid.hadamard(x), scipy_hadamard(64) @ x)
    spec = GridSpec(50, 1.0, 8, 10, SEED)
    v = np.random.default_rng(1).standard_normal(50)
    r = grid.rotate(v, spec)
    assert r.size == 64 and np.isclose(np.linalg.norm(r), np.linalg.norm(v))
    assert np.allclose(grid.unrotate(r, spec), v)


def test_pieces_keep_padding_small_and_rotation_orthonormal() -> None:
    assert grid.padded_size(33_153) == 33_280 and grid.pieces(33_280) == (32_768, 512)
    assert grid.pieces(grid.padded_size(1 << 20)) == (1 << 20,)
    assert grid.padded_size(100) == 128 and grid.pieces(128) == (128,)
    spec = GridSpec(33_153, 1.0, 8, 10, SEED)
    v = np.random.default_rng(2).standard_normal(33_153)
    r = grid.rotate(v, spec)
    assert np.isclose(np.linalg.norm(r), np.linalg.norm(v)) and np.allclose(grid.unrotate(r, spec), v)
    # A spike in the small tail piece is not clipped: that piece has its own, coarser grid.
    spike = np.zeros(33_153)
    spike[-1] = 1.0
    q = grid.quantize(spike, spec, np.random.default_rng(3))
    assert q.coords_clipped == 0
    assert np.linalg.norm(grid.decode_sum(q.values, spec) - spike) < 0.05


def test_rotation_flattens_a_spiky_vector() -> None:
    spec = GridSpec(4096, 1.0, 8, 10, SEED)
    spike = np.zeros(4096)
    spike[7] = 1.0
    rotated = grid.rotate(spike, spec)
    assert np.allclose(np.abs(rotated), 1 / 64)  # all the mass spread evenly over D coordinates


def test_ring_bits_no_wrap_bound_is_tight() -> None:
    """n devices all at +L (or -L) decode exactly; one more level than the bound allows wraps."""
    for cohort, bits in [(1, 2), (10, 8), (100, 8), (1000, 4), (3, 16)]:
        levels = grid.levels_for(bits)
        k = grid.ring_bits_for(cohort, levels)
        top = cohort * levels
        assert top <= 2 ** (k - 1) - 1  # it fits
        assert top > 2 ** (k - 2) - 1  # and k is the least that fits
        for sign in (1, -1):
            residues = sum(grid.to_ring(np.full(5, sign * levels), k).astype(np.int64) for _ in range(cohort))
            assert (grid.from_ring(np.asarray(residues) % 2**k, k) == sign * top).all()
        over = (2 ** (k - 1)) % 2**k  # one past the positive end reads as the negative end
        assert grid.from_ring(np.array([over], dtype=np.uint32), k)[0] == -(2 ** (k - 1))


def test_unmasked_sum_equals_plain_sum_and_mean_is_within_quantization_error() -> None:
    rng = np.random.default_rng(2)
    n_params, cohort = 3000, 40
    spec = GridSpec(n_params, 2.0, 8, cohort, os.urandom(32))
    deltas = rng.standard_normal((cohort, n_params)) * rng.uniform(0.001, 0.03, (cohort, 1))
    deltas[:5] *= 100  # some updates far beyond the clip norm
    quantized = [grid.quantize(d, spec, rng) for d in deltas]
    ring_total = sum(grid.to_ring(q.values, spec.ring_bits).astype(np.uint64) for q in quantized) % spec.modulus
    plain_total = np.sum([q.values for q in quantized], axis=0)
    assert (grid.from_ring(ring_total.astype(np.uint32), spec.ring_bits) == plain_total).all()
    clipped = np.array([d * min(1.0, 2.0 / np.linalg.norm(d)) for d in deltas])
    decoded = grid.decode_sum(plain_total, spec)
    err2 = float(np.sum((decoded - clipped.sum(axis=0)) ** 2))
    bound = grid.quantization_variance_bound(spec, cohort)
    assert err2 < 2 * bound  # E[err2] <= bound; 2x leaves room for the draw
    assert err2 > 0.2 * bound  # and it is a real rounding error of the expected size, not zero
    assert sum(q.clipped for q in quantized) == 5


def test_stochastic_rounding_is_unbiased() -> None:
    spec = GridSpec(256, 1.0, 4, 10, SEED)
    x = np.random.default_rng(3).standard_normal(256) * 0.05
    rng = np.random.default_rng(4)
    mean = np.mean([grid.decode_sum(grid.quantize(x, spec, rng).values, spec) for _ in range(400)], axis=0)
    assert np.abs(mean - x).max() < 5 * spec.step / np.sqrt(400)


def test_grid_refuses_settings_that_overflow_and_bad_updates() -> None:
    with pytest.raises(PrivacyError, match="V601"):
        GridSpec(10, 1.0, 24, 1 << 20, SEED)
    with pytest.raises(PrivacyError, match="V601"):
        GridSpec(10, -1.0, 8, 3, SEED)
    spec = GridSpec(10, 1.0, 8, 3, SEED)
    with pytest.raises(PrivacyError, match="V602"):
        grid.quantize(np.full(10, np.nan), spec, np.random.default_rng())
    with pytest.raises(PrivacyError, match="V602"):
        grid.quantize(np.zeros(11), spec, np.random.default_rng())
    assert GridSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("bits", [1, 5, 8, 11, 15, 16, 23, 32])
def test_bit_packing_round_trips_at_exact_size(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 2**bits, 1001, dtype=np.uint64).astype(np.uint32)
    packed = pack_bits(values, bits)
    assert len(packed) == (1001 * bits + 7) // 8
    assert (unpack_bits(packed, bits, 1001) == values).all()


# --- Shamir --------------------------------------------------------------------------------------------


def test_shamir_known_vector() -> None:
    """The textbook example (f(x) = 1234 + 166x + 94x^2): shares (1,1494) ... (6,5614)."""
    shares = shamir.split(1234, 3, [1, 2, 3, 4, 5, 6], coefficients=[166, 94])
    assert shares == [1494, 1942, 2578, 3402, 4414, 5614]
    points = list(zip(range(1, 7), shares, strict=True))
    for subset in combinations(points, 3):
        assert shamir.combine(list(subset), 3) == 1234
    # In the field, too: a coefficient near p wraps as modular arithmetic says.
    assert shamir.split(5, 2, [1, 2], coefficients=[shamir.PRIME - 1]) == [4, 3]


def test_shamir_random_secrets_and_fewer_shares_say_nothing() -> None:
    secret = os.urandom(32)
    s = shamir.secret_to_int(secret)
    xs = list(range(1, 11))
    shares = shamir.split(s, 4, xs)
    points = list(zip(xs, shares, strict=True))
    assert shamir.int_to_secret(shamir.combine(points[3:7], 4)) == secret
    # Any 3 shares are consistent with every candidate secret: interpolating them with (0, guess) works.
    guess = shamir.secret_to_int(os.urandom(32))
    four = [(0, guess), *points[:3]]
    assert shamir.lagrange_at(four, 0) == guess
    # a false share is caught by consistency against a trusted basis
    bad = [*points[4:], (points[0][0], (points[0][1] + 1) % shamir.PRIME)]
    assert shamir.consistent(bad, points[:4]) == [True] * 6 + [False]


def test_shamir_refuses_bad_parameters() -> None:
    with pytest.raises(PrivacyError, match="V610"):
        shamir.split(1, 5, [1, 2, 3])
    with pytest.raises(PrivacyError, match="V610"):
        shamir.split(1, 2, [1, 1])
    with pytest.raises(PrivacyError, match="V606"):
        shamir.combine([(1, 2)], 2)
    with pytest.raises(PrivacyError, match="V603"):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)


# --- private statistics ---------------------------------------------------------------------------------


def test_counts_go_through_the_ring_exactly() -> None:
    rng = np.random.default_rng(5)
    cohort, max_count = 30, 500
    k = stats.count_ring_bits(cohort, max_count)
    counts = rng.integers(0, max_count + 1, (cohort, 64))
    total = sum(stats.counts_to_ring(c, max_count, k).astype(np.uint64) for c in counts) % 2**k
    assert (grid.from_ring(total.astype(np.uint32), k) == counts.sum(axis=0)).all()
    with pytest.raises(PrivacyError, match="V602"):
        stats.counts_to_ring(np.array([max_count + 1]), max_count, k)


def test_coarsen_and_suppress() -> None:
    h = np.arange(10)
    assert stats.coarsen(h, 3).tolist() == [3, 12, 21, 9]
    assert stats.coarsen(np.ones((2, 1000), dtype=np.int64), 100).tolist() == [[100] * 10] * 2
    released, n = stats.suppress_small_cells(np.array([0, 1, 4, 5, 9]), 5)
    assert released.tolist() == [0, 0, 0, 5, 9] and n == 2


def test_geometric_noise_has_the_two_sided_geometric_variance() -> None:
    eps = 0.7
    noised = stats.geometric_noise(np.zeros(200_000, dtype=np.int64), eps, np.random.default_rng(6))
    a = np.exp(-eps)
    assert np.isclose(noised.var(), 2 * a / (1 - a) ** 2, rtol=0.03)
    assert abs(noised.mean()) < 0.02
    released, info = stats.private_histogram(np.arange(1000) % 3, 100, 10, 1.0, np.random.default_rng(7))
    assert released.shape == (10,) and info["bins"] == 10


def test_two_pass_secure_moments_match_pooled_numpy() -> None:
    """Decision 0010: pooled mean and variance from two secure sums of fixed-point integers."""
    rng = np.random.default_rng(8)
    sites = [rng.normal(loc, 3.0, (n, 4)) for loc, n in [(100.0, 50), (120.0, 80), (90.0, 30)]]
    sites[1][3, 2] = np.nan  # a missing value is not counted
    scale, bound = 1e-3, 1000.0
    k = 32  # the sums fit: 160 rows x 1000 / 1e-3 = 1.6e8 < 2^31
    first = [stats.first_pass(X, scale, bound) for X in sites]
    counts = sum(c for c, _ in first)
    sums = grid.from_ring(sum(grid.to_ring(s, k).astype(np.uint64) for _, s in first) % 2**k, k)
    mean = sums * scale / counts
    second = [stats.second_pass(X, mean, scale, bound) for X in sites]
    m2 = grid.from_ring(sum(grid.to_ring(s, k).astype(np.uint64) for s in second) % 2**k, k) * scale
    pooled = np.vstack(sites)
    assert np.allclose(mean, np.nanmean(pooled, axis=0), atol=1e-4)
    assert np.allclose(m2 / (counts - 1), np.nanvar(pooled, axis=0, ddof=1), rtol=1e-5)
