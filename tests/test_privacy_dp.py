"""DP noise, accounting and the dp strategy, against closed forms computed here and measured draws."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from scipy import stats

from coordinator.aggregation import build_strategy, clipped
from coordinator.aggregation.dp import DPAccumulator, DPFedAvg
from coordinator.aggregation.fedavg import FedAvg
from coordinator.privacy.accounting import (
    PrivacyLedger,
    RoundEvent,
    adaptive_clip_update_noise,
    epsilon_of,
    noise_multiplier_for,
)
from edge_runtime.secagg import noise
from edge_runtime.secagg.errors import PrivacyError


def _eps_from_rdp(rdp_per_order: np.ndarray, delta: float) -> float:
    """RDP -> (eps, delta), Canonne-Kamath-Steinke 2020 Prop. 12: eps = r + log(1-1/a) - log(delta·a)/(a-1)."""
    a = np.asarray(DEFAULT_RDP_ORDERS, dtype=np.float64)
    keep = a > 1.01
    eps = rdp_per_order[keep] + np.log1p(-1 / a[keep]) - np.log(delta * a[keep]) / (a[keep] - 1)
    return float(max(0.0, eps.min()))


@pytest.mark.parametrize("z, rounds, delta", [(1.1, 50, 1e-6), (0.8, 10, 1e-5), (3.0, 200, 1e-6)])
def test_gaussian_epsilon_after_r_rounds_matches_closed_form_rdp(z: float, rounds: int, delta: float) -> None:
    """The plain Gaussian's RDP is a/(2 z^2) per round (Mironov 2017); R rounds compose additively."""
    a = np.asarray(DEFAULT_RDP_ORDERS, dtype=np.float64)
    expected = _eps_from_rdp(rounds * a / (2 * z * z), delta)
    ledger = PrivacyLedger(1e9, delta)
    for _ in range(rounds):
        ledger.record(RoundEvent("gaussian", z))
    assert math.isclose(ledger.epsilon, expected, rel_tol=1e-9)
    # A second, tighter accountant (privacy loss distributions) never gives more, and not far less.
    pld = PLDAccountant(value_discretization_interval=1e-2)  # coarse is pessimistic, still a valid bound
    pld.compose(dp_accounting.GaussianDpEvent(z), rounds)
    pld_eps = pld.get_epsilon(delta)
    assert 0.6 * expected < pld_eps <= expected * 1.001


def test_zcdp_rounds_match_closed_form() -> None:
    rho = noise.ddgauss_rho(delta2=100.0, sigma_dev=60.0, contributors=10, dimension=2**16)
    # tau is astronomically small at sigma 60, so rho = Delta^2 / (2 m sigma^2)
    assert math.isclose(rho, 100.0**2 / (2 * 10 * 60.0**2), rel_tol=1e-12)
    a = np.asarray(DEFAULT_RDP_ORDERS, dtype=np.float64)
    expected = _eps_from_rdp(30 * rho * a, 1e-6)
    assert math.isclose(epsilon_of([RoundEvent("zcdp", rho=rho)] * 30, 1e-6), expected, rel_tol=1e-9)


def test_ddgauss_tau_matters_at_small_sigma() -> None:
    """At sigma_dev ~ 0.3 the sum is far from one discrete Gaussian: the bound must be larger than the naive one."""
    naive = 5.0 / (math.sqrt(10) * 0.3)
    assert noise.ddgauss_epsilon(5.0, 0.3, 10, 1000) > naive * 1.01
    assert math.isclose(noise.tau(0.3, 3), 10 * sum(math.exp(-2 * math.pi**2 * 0.09 * k / (k + 1)) for k in (1, 2)))


def test_ledger_stops_a_task_at_its_budget() -> None:
    ledger = PrivacyLedger(3.0, 1e-6)
    event = RoundEvent("gaussian", 4.0)
    rounds = 0
    while ledger.allows(event):
        ledger.record(event)
        rounds += 1
    assert 0 < ledger.epsilon <= 3.0 and rounds >= 1
    assert epsilon_of([event] * (rounds + 1), 1e-6) > 3.0
    with pytest.raises(PrivacyError, match="V609"):
        ledger.record(event)
    restored = PrivacyLedger(3.0, 1e-6, [RoundEvent.from_dict(e.to_dict()) for e in ledger.events])
    assert restored.epsilon == ledger.epsilon


def test_calibrated_noise_spends_the_budget() -> None:
    z = noise_multiplier_for(3.0, 1e-6, 20)
    assert epsilon_of([RoundEvent("gaussian", z)] * 20, 1e-6) == pytest.approx(3.0, abs=0.01)
    sub = noise_multiplier_for(3.0, 1e-6, 20, sampling_rate=0.1)
    assert sub < z  # amplification by sampling


def test_discrete_gaussian_draws_match_the_formula() -> None:
    rng = np.random.default_rng(0)
    for sigma in (0.8, 3.0, 250.0):
        draws = noise.sample_discrete_gaussian(sigma, 400_000, rng)
        # variance of N_Z(0, s^2) from its pmf, summed directly
        support = np.arange(-int(12 * sigma) - 3, int(12 * sigma) + 4)
        pmf = np.exp(-(support**2) / (2 * sigma**2))
        pmf /= pmf.sum()
        var = float((pmf * support**2).sum())
        assert draws.var() == pytest.approx(var, rel=0.01)
        assert abs(draws.mean()) < 4 * math.sqrt(var / draws.size)
    small = noise.sample_discrete_gaussian(1.5, 200_000, rng)
    support = np.arange(-6, 7)
    pmf = np.exp(-(support**2) / (2 * 1.5**2))
    pmf /= pmf.sum()
    counts = np.array([(small == s).sum() for s in support])
    assert stats.chisquare(counts, pmf * counts.sum() / pmf.sum()).pvalue > 1e-3


def test_device_shares_sum_to_the_round_noise() -> None:
    """m devices each adding sigma_dev = z·Delta/sqrt(m) give a sum of std z·Delta (measured)."""
    m, z, delta2 = 20, 1.2, 300.0
    sigma_dev = noise.device_sigma(z, delta2, m)
    rng = np.random.default_rng(1)
    total = sum(noise.sample_discrete_gaussian(sigma_dev, 50_000, rng) for _ in range(m))
    assert total.std() == pytest.approx(z * delta2, rel=0.02)
    bound = noise.noise_bound(sigma_dev, m, 50_000)
    assert np.abs(total).max() < bound


# --- the dp strategy --------------------------------------------------------------------------------------


def _round(strategy: DPFedAvg, deltas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    acc = strategy.new_accumulator(deltas.shape[1])
    for d, w in zip(deltas, weights, strict=True):
        acc.add(d, w)
    return strategy.aggregate_measured(np.zeros(deltas.shape[1], np.float32), acc)


def test_dp_mean_is_unweighted_clipped_and_noised_by_the_formula() -> None:
    rng = np.random.default_rng(2)
    deltas = (rng.standard_normal((8, 4000)) * 0.05).astype(np.float32)
    weights = np.array([50_000_000, 10, 10, 10, 10, 10, 10, 10], dtype=np.float64)
    strategy = build_strategy({"name": "dp", "noise_multiplier": 0.7, "clip": 2.0, "seed": 3})
    assert isinstance(strategy, DPFedAvg)
    new, measured = _round(strategy, deltas, weights)
    clip = 2.0
    clipped_d = np.array([d * min(1.0, clip / np.linalg.norm(d.astype(np.float64))) for d in deltas])
    residual = new.astype(np.float64) - clipped_d.mean(axis=0)
    # the residual is the noise: std z·C/n per coordinate (4000 draws: 2.2% rel. std error)
    assert residual.std() == pytest.approx(0.7 * clip / 8, rel=0.08)
    assert measured["noise_stddev"] == pytest.approx(0.7 * clip)
    assert measured["clipped"] == float(sum(np.linalg.norm(d) > clip for d in deltas.astype(np.float64)))
    # the device claiming 50M samples got one vote: a weighted mean would sit on its update
    assert np.linalg.norm(residual + clipped_d.mean(axis=0) - clipped_d[0]) > 0.5 * np.linalg.norm(clipped_d[0])


def test_adaptive_clip_tracks_the_target_quantile_and_survives_restart() -> None:
    rng = np.random.default_rng(4)
    strategy = build_strategy(
        {
            "name": "dp",
            "noise_multiplier": 1.0,
            "clip": "adaptive",
            "initial_clip": 0.01,
            "count_stddev": 2.0,
            "seed": 5,
        }
    )
    assert isinstance(strategy, DPFedAvg)
    norms_target = []
    for _ in range(60):
        scales = rng.uniform(0.5, 1.5, (40, 1))
        deltas = (rng.standard_normal((40, 100)) / 10.0 * scales).astype(np.float32)
        norms_target.append(np.median(np.linalg.norm(deltas.astype(np.float64), axis=1)))
        _, measured = _round(strategy, deltas, np.ones(40))
    assert strategy.clip_norm == pytest.approx(float(np.median(norms_target)), rel=0.25)
    assert measured["next_clip_norm"] == strategy.clip_norm
    fresh = build_strategy(strategy.to_spec())
    assert isinstance(fresh, DPFedAvg)
    fresh.load_state_dict(strategy.state_dict())
    assert fresh.clip_norm == strategy.clip_norm
    z_update = adaptive_clip_update_noise(1.0, 2.0)
    assert z_update > 1.0 and (z_update**-2 + (2 * 2.0) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(PrivacyError, match="V609"):
        adaptive_clip_update_noise(1.0, 0.4)


def test_dp_refuses_robust_inner_and_clips() -> None:
    with pytest.raises(Exception, match="A002"):
        build_strategy(
            {"name": "dp", "noise_multiplier": 1.0, "clip": 1.0, "inner": "coordinate_median"}
        ).new_accumulator(5)
    strategy = build_strategy({"name": "dp", "noise_multiplier": 1.0, "clip": 1.0, "seed": 1})
    acc = strategy.new_accumulator(5)
    acc.add(np.ones(5, np.float32) * 3, 1.0)
    assert isinstance(acc, DPAccumulator)
    assert acc.count == 1 and acc.n_clipped == 1


def test_clipped_caps_claimed_weights() -> None:
    deltas = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    strategy = clipped(FedAvg(), max_norm=10.0, max_weight=100.0)
    acc = strategy.new_accumulator(2)
    acc.add(deltas[0], 50_000_000)
    acc.add(deltas[1], 100)
    new, measured = strategy.aggregate_measured(np.zeros(2, np.float32), acc)
    assert np.allclose(new, [0.5, 0.5])
    assert measured["weights_capped"] == 1.0
    assert build_strategy(strategy.to_spec()).to_spec() == strategy.to_spec()
