"""Aggregation strategies against direct numpy/scipy computations on the same updates."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from coordinator.aggregation import (
    STRATEGIES,
    AggregationError,
    ClippingAccumulator,
    FedAvg,
    SpillAccumulator,
    Strategy,
    build_strategy,
    clipped,
    decode_state,
    encode_state,
)
from coordinator.aggregation import math as agg_math
from edge_runtime.trainer import TrainConfig

N_PARAMS = 301


def _updates(k: int, n: int = N_PARAMS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k float32 deltas with a wide dynamic range, and integer sample counts as weights."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-4, 1, size=(k, 1))
    deltas = (rng.standard_normal((k, n)) * scale).astype(np.float32)
    weights = rng.integers(1, 5000, size=k).astype(np.float64)
    return deltas, weights


def _global(n: int = N_PARAMS, seed: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _run_round(
    strategy: Strategy, params: np.ndarray, deltas: np.ndarray, weights: np.ndarray, spill: Path
) -> np.ndarray:
    with strategy.new_accumulator(params.size, spill) as acc:
        for delta, weight in zip(deltas, weights, strict=True):
            acc.add(delta, weight)
        return strategy.aggregate(params, acc)


# --- the pure math -----------------------------------------------------------------------------------


def test_fold_weighted_is_the_weighted_sum() -> None:
    deltas, weights = _updates(17)
    total = np.zeros(N_PARAMS)
    for delta, weight in zip(deltas, weights, strict=True):
        assert agg_math.fold_weighted(total, delta, weight) == 0
    np.testing.assert_allclose(total, (weights[:, None] * deltas.astype(np.float64)).sum(axis=0), rtol=1e-13)
    np.testing.assert_allclose(
        agg_math.weighted_mean(total, weights.sum()), np.average(deltas, axis=0, weights=weights), rtol=1e-12
    )


def test_fold_weighted_refuses_non_finite_and_leaves_the_sum_untouched() -> None:
    total = np.arange(5, dtype=np.float64)
    bad = np.array([1, np.nan, 2, np.inf, -np.inf], np.float32)
    assert agg_math.fold_weighted(total, bad, 2.0) == 3
    np.testing.assert_array_equal(total, np.arange(5))


def test_squared_norm_in_float64_even_where_float32_overflows() -> None:
    x = np.array([3e19, 4e19, 1.5], np.float32)
    assert agg_math.squared_norm(x) == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-15)
    assert np.isfinite(agg_math.squared_norm(x))
    big = np.random.default_rng(0).standard_normal(10_001).astype(np.float32)
    assert agg_math.squared_norm(big) == pytest.approx(float(np.sum(big.astype(np.float64) ** 2)), rel=1e-13)
    big[7777] = np.nan
    assert np.isnan(agg_math.squared_norm(big))
    big[7777] = -np.inf
    assert agg_math.squared_norm(big) == np.inf


@pytest.mark.parametrize("k", [1, 2, 7, 8, 40])
def test_coordinate_median_matches_numpy(k: int) -> None:
    deltas, _ = _updates(k)
    np.testing.assert_array_equal(agg_math.coordinate_median(deltas), np.median(deltas.astype(np.float64), axis=0))


@pytest.mark.parametrize(("k", "beta"), [(1, 0.2), (5, 0.0), (10, 0.1), (10, 0.25), (31, 0.2), (40, 0.49), (100, 0.29)])
def test_trimmed_mean_matches_scipy(k: int, beta: float) -> None:
    deltas, _ = _updates(k)
    np.testing.assert_allclose(
        agg_math.trimmed_mean(deltas, beta),
        stats.trim_mean(deltas.astype(np.float64), beta, axis=0),
        rtol=1e-12,
        atol=1e-300,
    )


def _reference_fedopt(
    kind: str, x0: np.ndarray, pseudo_grads: list[np.ndarray], lr: float, b1: float, b2: float, tau: float
) -> list[np.ndarray]:
    """Reddi et al. 2021, Algorithm 2, one scalar at a time; params are float32 between rounds."""
    x = [float(v) for v in x0]
    m = [0.0] * len(x)
    v = [tau * tau] * len(x)
    models = []
    for grad in pseudo_grads:
        for i, d in enumerate(grad.tolist()):
            m[i] = b1 * m[i] + (1 - b1) * d
            if kind == "fedadam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            elif kind == "fedyogi":
                v[i] = v[i] - (1 - b2) * d * d * ((v[i] > d * d) - (v[i] < d * d))
            else:
                v[i] = v[i] + d * d
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        x = [float(np.float32(xi)) for xi in x]
        models.append(np.array(x, np.float32))
    return models


# --- each strategy against a direct computation ------------------------------------------------------------


def test_fedavg_is_the_sample_weighted_mean(tmp_path: Path) -> None:
    deltas, weights = _updates(29)
    params = _global()
    got = _run_round(build_strategy("fedavg"), params, deltas, weights, tmp_path)
    expected = (params.astype(np.float64) + np.average(deltas.astype(np.float64), axis=0, weights=weights)).astype(
        np.float32
    )
    np.testing.assert_array_max_ulp(got, expected, maxulp=1)
    assert got.dtype == np.float32


def test_fedavg_uniform_weighting_and_server_lr(tmp_path: Path) -> None:
    deltas, weights = _updates(12)
    params = _global()
    got = _run_round(
        build_strategy({"name": "fedavg", "weighting": "uniform", "server_lr": 0.5}), params, deltas, weights, tmp_path
    )
    expected = (params.astype(np.float64) + 0.5 * deltas.astype(np.float64).mean(axis=0)).astype(np.float32)
    np.testing.assert_array_max_ulp(got, expected, maxulp=1)


def test_fedprox_aggregates_as_fedavg_and_sends_mu_to_devices(tmp_path: Path) -> None:
    deltas, weights = _updates(9)
    params = _global()
    prox = build_strategy({"name": "fedprox", "mu": 0.3})
    np.testing.assert_array_equal(
        _run_round(prox, params, deltas, weights, tmp_path), _run_round(FedAvg(), params, deltas, weights, tmp_path)
    )
    overrides = prox.client_config(4)
    assert overrides == {"prox_mu": 0.3}
    assert TrainConfig(**overrides).prox_mu == 0.3  # the names are the trainer's
    assert FedAvg().client_config(4) == {}


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_match_the_paper_over_rounds(name: str, tmp_path: Path) -> None:
    options = {"server_lr": 0.05, "beta1": 0.8, "tau": 1e-2}
    if name != "fedadagrad":
        options["beta2"] = 0.95
    strategy = build_strategy({"name": name, **options})
    params = _global()
    rounds = [_updates(6 + r, seed=r) for r in range(4)]
    # Round 2 repeats round 1's updates so Yogi's sign(v - d^2) takes both signs.
    rounds[2] = rounds[1]
    pseudo = [np.average(d.astype(np.float64), axis=0, weights=w) for d, w in rounds]
    expected = _reference_fedopt(name, params, pseudo, 0.05, 0.8, options.get("beta2", 0.0), 1e-2)
    for (deltas, weights), want in zip(rounds, expected, strict=True):
        params = _run_round(strategy, params, deltas, weights, tmp_path)
        np.testing.assert_array_max_ulp(params, want, maxulp=2)


def test_coordinate_median_strategy_is_numpy_median(tmp_path: Path) -> None:
    deltas, weights = _updates(14)
    params = _global()
    got = _run_round(build_strategy("coordinate_median"), params, deltas, weights, tmp_path)
    expected = (params.astype(np.float64) + np.median(deltas.astype(np.float64), axis=0)).astype(np.float32)
    np.testing.assert_array_equal(got, expected)


def test_trimmed_mean_strategy_is_scipy_trim_mean(tmp_path: Path) -> None:
    deltas, weights = _updates(21)
    params = _global()
    got = _run_round(build_strategy({"name": "trimmed_mean", "beta": 0.2}), params, deltas, weights, tmp_path)
    expected = params.astype(np.float64) + stats.trim_mean(deltas.astype(np.float64), 0.2, axis=0)
    np.testing.assert_array_max_ulp(got, expected.astype(np.float32), maxulp=1)


def test_robust_statistics_leave_their_input_alone() -> None:
    for values in (_updates(9)[0], _updates(9, n=1)[0], _updates(1)[0]):
        before = values.copy()
        agg_math.coordinate_median(values)
        agg_math.trimmed_mean(values, 0.2)
        np.testing.assert_array_equal(values, before)


@pytest.mark.parametrize(("k", "width"), [(1, 5), (4, 1), (3, 1000)])
def test_spill_accumulator_with_one_update_or_one_parameter_per_chunk(k: int, width: int, tmp_path: Path) -> None:
    deltas, weights = _updates(k)
    with SpillAccumulator(N_PARAMS, agg_math.coordinate_median, tmp_path, chunk_bytes=k * 4 * width) as acc:
        for delta, weight in zip(deltas, weights, strict=True):
            acc.add(delta, weight)
        np.testing.assert_array_equal(acc.result(), np.median(deltas.astype(np.float64), axis=0))


@pytest.mark.parametrize("statistic", ["median", "trimmed"])
def test_spill_file_chunks_equal_the_in_memory_answer(statistic: str, tmp_path: Path) -> None:
    deltas, weights = _updates(33, n=1009)
    fn = agg_math.coordinate_median if statistic == "median" else (lambda v: agg_math.trimmed_mean(v, 0.1))
    # 7 parameters per chunk: 145 chunks, the last one short.
    with SpillAccumulator(1009, fn, tmp_path, chunk_bytes=33 * 4 * 7) as acc:
        for delta, weight in zip(deltas, weights, strict=True):
            acc.add(delta, weight)
        assert acc.path is not None and acc.path.parent == tmp_path
        assert acc.path.stat().st_size == 33 * 1009 * 4
        np.testing.assert_array_equal(acc.result(), fn(deltas))
        assert acc.total_weight == weights.sum()
        spill_file = acc.path
    assert not spill_file.exists()  # closing removes the spill file


@pytest.mark.parametrize("name", ["fedavg", "coordinate_median", "trimmed_mean"])
def test_result_does_not_depend_on_arrival_order(name: str, tmp_path: Path) -> None:
    deltas, weights = _updates(200, n=2000)
    params = _global(2000)
    strategy = build_strategy(name)
    first = _run_round(strategy, params, deltas, weights, tmp_path)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(deltas))
        again = _run_round(strategy, params, deltas[order], weights[order], tmp_path)
        if name == "fedavg":
            # float64 sums differ in the last bits of float64 at most: float32 results agree to 1 ulp
            np.testing.assert_array_max_ulp(again, first, maxulp=1)
            assert np.mean(again == first) > 0.999
        else:
            np.testing.assert_array_equal(again, first)


# --- clipping ------------------------------------------------------------------------------------------


def test_clipping_bounds_each_update_norm(tmp_path: Path) -> None:
    deltas, weights = _updates(25)
    max_norm = 0.5
    strategy = clipped(build_strategy({"name": "fedavg", "weighting": "uniform"}), max_norm)
    norms = np.linalg.norm(deltas.astype(np.float64), axis=1)
    assert (norms > max_norm).sum() >= 5 and (norms < max_norm).sum() >= 5
    expected_clipped = deltas.astype(np.float64) * np.minimum(1.0, max_norm / norms)[:, None]
    params = _global()
    with strategy.new_accumulator(N_PARAMS, tmp_path) as acc:
        assert isinstance(acc, ClippingAccumulator)
        for delta, weight in zip(deltas, weights, strict=True):
            acc.add(delta, weight)
        assert acc.n_clipped == int((norms > max_norm).sum())
        mean_delta = acc.result()
        new = strategy.aggregate(params, acc)
    np.testing.assert_allclose(mean_delta, expected_clipped.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(new, params + expected_clipped.mean(axis=0), rtol=1e-6, atol=1e-7)
    for delta in deltas:  # each update alone: what the inner accumulator received has norm <= max_norm
        with strategy.new_accumulator(N_PARAMS, tmp_path) as one:
            one.add(delta, 1.0)
            assert np.linalg.norm(one.result()) <= max_norm * (1 + 1e-6)


def test_clipping_bounds_one_huge_update(tmp_path: Path) -> None:
    huge = np.full(N_PARAMS, 3e18, np.float32)
    strategy = build_strategy({"name": "clipped", "max_norm": 2.0, "inner": "fedavg"})
    params = _global()
    new = _run_round(strategy, params, huge[None, :], np.array([10.0]), tmp_path)
    step = np.linalg.norm(new.astype(np.float64) - params)
    assert step == pytest.approx(2.0, rel=1e-5)


def test_clipped_wraps_any_strategy_and_keeps_its_behaviour(tmp_path: Path) -> None:
    spec = {"name": "clipped", "max_norm": 1e9, "inner": {"name": "fedprox", "mu": 0.1}}
    strategy = build_strategy(spec)
    assert strategy.client_config(1) == {"prox_mu": 0.1}
    assert build_strategy(strategy.to_spec()).to_spec() == strategy.to_spec()
    deltas, weights = _updates(8)
    params = _global()
    np.testing.assert_array_equal(
        _run_round(strategy, params, deltas, weights, tmp_path), _run_round(FedAvg(), params, deltas, weights, tmp_path)
    )


# --- state: strategy state --------------------------------------------------------


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavg", "trimmed_mean"])
def test_state_dict_round_trip_gives_identical_next_rounds(name: str, tmp_path: Path) -> None:
    spec = {"name": "clipped", "max_norm": 20.0, "inner": {"name": name}}
    running = build_strategy(spec)
    params = _global()
    for r in range(2):
        params = _run_round(running, params, *_updates(5, seed=r), tmp_path)
    blob = encode_state(running.state_dict())
    restarted = build_strategy(spec)
    restarted.load_state_dict(decode_state(blob))
    for r in range(2, 4):
        deltas, weights = _updates(5, seed=r)
        a = _run_round(running, params, deltas, weights, tmp_path)
        b = _run_round(restarted, params, deltas, weights, tmp_path)
        np.testing.assert_array_equal(a, b)
        params = a
    if name.startswith("fed") and name != "fedavg":
        # and the state matters: a fresh optimizer takes a different step
        fresh = _run_round(build_strategy(spec), params, deltas, weights, tmp_path)
        assert not np.array_equal(fresh, _run_round(running, params, deltas, weights, tmp_path))


def test_state_of_another_strategy_or_model_is_refused(tmp_path: Path) -> None:
    adam = build_strategy("fedadam")
    _run_round(adam, _global(), *_updates(3), tmp_path)
    state = decode_state(encode_state(adam.state_dict()))
    with pytest.raises(AggregationError) as err:
        build_strategy("fedyogi").load_state_dict(state)
    assert err.value.code == "FHAI-A007" and "'fedadam'" in err.value.message
    other = build_strategy("fedadam")
    other.load_state_dict(state)
    with pytest.raises(AggregationError) as err:
        _run_round(other, _global(50), *_updates(3, n=50), tmp_path)
    assert err.value.code == "FHAI-A007"


def test_state_files_never_unpickle(tmp_path: Path) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, strategy=np.array([{"a": 1}], dtype=object))  # object arrays are pickled in npz
    with pytest.raises(AggregationError) as err:
        decode_state(buffer.getvalue())
    assert err.value.code == "FHAI-A007"
    with pytest.raises(AggregationError):
        decode_state(b"not a state file")


def test_spill_accumulator_resident_memory_is_bounded_by_its_chunk(tmp_path: Path) -> None:
    """400 updates of 250k parameters (400 MB on disk), 8 MB chunks: aggregating must not map the file in."""
    script = textwrap.dedent(
        f"""
        import json, resource, numpy as np
        from coordinator.aggregation import build_strategy
        strategy = build_strategy({{"name": "trimmed_mean", "beta": 0.1, "chunk_mb": 8}})
        acc = strategy.new_accumulator(250_000, {str(tmp_path)!r})
        rng = np.random.default_rng(0)
        delta = rng.standard_normal(250_000).astype(np.float32)
        for i in range(400):
            acc.add(delta * np.float32(i % 7), 1.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        strategy.aggregate(np.zeros(250_000, np.float32), acc)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth_mb": (after - before) / 1024, "file_mb": acc.path.stat().st_size / 2**20}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True, text=True)
    figures = json.loads(done.stdout)
    assert figures["file_mb"] > 380
    assert figures["growth_mb"] < 30, figures  # one 8 MB chunk, its sorted copy, the float64 result


# --- registry and errors -------------------------------------------------------------------------------------


def test_every_registered_strategy_builds_from_its_spec(tmp_path: Path) -> None:
    for name, cls in STRATEGIES.items():
        required = {"clipped": {"max_norm": 3.0}, "dp": {"noise_multiplier": 1.0, "clip": 1.0}}
        spec = {"name": name, **required.get(name, {})}
        strategy = build_strategy(spec)
        assert type(strategy) is cls and strategy.name == name
        assert build_strategy(strategy.to_spec()).to_spec() == strategy.to_spec()
        new = _run_round(strategy, _global(), *_updates(4), tmp_path)
        assert new.shape == (N_PARAMS,) and new.dtype == np.float32 and np.isfinite(new).all()


def test_yaml_spec_builds_the_configured_strategy() -> None:
    import yaml

    task = yaml.safe_load("strategy: {name: fedadam, server_lr: 0.01, beta2: 0.999}")
    strategy = build_strategy(task["strategy"])
    assert strategy.name == "fedadam"
    assert strategy.to_spec()["server_lr"] == 0.01 and strategy.to_spec()["beta2"] == 0.999


def test_unknown_strategy_name_is_a_clear_error() -> None:
    with pytest.raises(AggregationError) as err:
        build_strategy({"name": "FedAvgM"})
    assert err.value.code == "FHAI-A001"
    assert "'FedAvgM'" in err.value.message and "fedavg" in err.value.message and "trimmed_mean" in err.value.message
    with pytest.raises(AggregationError) as err:
        build_strategy({"server_lr": 1.0})
    assert err.value.code == "FHAI-A001"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"name": "fedadam", "server_lr": -1}, ["server_lr", "greater than 0", "-1"]),
        ({"name": "trimmed_mean", "beta": 0.5}, ["beta", "less than 0.5"]),
        ({"name": "fedavg", "weighting": "by_size"}, ["weighting", "samples", "uniform"]),
        ({"name": "fedyogi", "betta2": 0.9}, ["unknown option 'betta2'", "beta2"]),
        ({"name": "clipped"}, ["max_norm", "required"]),
        ({"name": "clipped", "max_norm": 1.0, "inner": {"name": "fedprox", "mu": -2}}, ["'fedprox'", "mu"]),
        (["fedavg"], ["mapping"]),
    ],
)
def test_bad_options_are_a_clear_error(spec: object, words: list[str]) -> None:
    with pytest.raises(AggregationError) as err:
        build_strategy(spec)  # type: ignore[arg-type]
    assert err.value.code == "FHAI-A002"
    for word in words:
        assert word in err.value.message


def test_bad_updates_are_refused_and_leave_the_round_intact(tmp_path: Path) -> None:
    for spec in ["fedavg", "trimmed_mean", {"name": "clipped", "max_norm": 1.0}]:
        strategy = build_strategy(spec)  # type: ignore[arg-type]
        deltas, weights = _updates(4)
        with strategy.new_accumulator(N_PARAMS, tmp_path) as acc:
            with pytest.raises(AggregationError) as err:
                acc.add(deltas[0][:-1], 1.0)
            assert err.value.code == "FHAI-A003"
            poisoned = deltas[0].copy()
            poisoned[3] = np.nan
            with pytest.raises(AggregationError) as err:
                acc.add(poisoned, 1.0)
            assert err.value.code == "FHAI-A004"
            for weight in (0.0, -3.0, float("nan")):
                with pytest.raises(AggregationError) as err:
                    acc.add(deltas[0], weight)
                assert err.value.code == "FHAI-A005"
            with pytest.raises(AggregationError) as err:
                strategy.aggregate(_global(), acc)
            assert err.value.code == "FHAI-A006"
            for delta, weight in zip(deltas, weights, strict=True):
                acc.add(delta, weight)
            assert acc.count == 4
            with pytest.raises(AggregationError) as err:
                strategy.aggregate(_global(N_PARAMS + 1), acc)
            assert err.value.code == "FHAI-A009"
            got = strategy.aggregate(_global(), acc)
        np.testing.assert_array_equal(got, _run_round(strategy, _global(), deltas, weights, tmp_path))
        with pytest.raises(AggregationError) as err:
            acc.add(deltas[0], 1.0)
        assert err.value.code == "FHAI-A008"


# --- robustness --------------------------------------------------------------------------------------------


def test_robust_strategies_resist_a_few_huge_poisoned_updates(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    target = rng.normal(0, 1, N_PARAMS)
    honest = (target + rng.normal(0, 0.1, (27, N_PARAMS))).astype(np.float32)
    poisoned = np.full((3, N_PARAMS), 1e6, np.float32) * rng.choice([-1, 1], size=(3, 1))
    deltas = np.concatenate([honest[:10], poisoned, honest[10:]])
    weights = np.full(len(deltas), 100.0)
    weights[10:13] = 5000.0  # the attackers also claim many samples
    zero = np.zeros(N_PARAMS, np.float32)

    def error(spec: dict[str, object]) -> float:
        new = _run_round(build_strategy(spec), zero, deltas, weights, tmp_path)
        return float(np.max(np.abs(new - target)))

    assert error({"name": "fedavg"}) > 1e4
    assert error({"name": "coordinate_median"}) < 0.15
    assert error({"name": "trimmed_mean", "beta": 0.15}) < 0.15  # drops int(0.15 * 30) = 4 per side
    assert error({"name": "clipped", "max_norm": 2.0, "inner": "fedavg"}) < 3.0  # bounded, not removed


def test_trimmed_mean_warns_when_it_trims_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    strategy = build_strategy({"name": "trimmed_mean", "beta": 0.1})
    with caplog.at_level("WARNING", logger="coordinator.aggregation.trimmed_mean"):
        _run_round(strategy, _global(), *_updates(9), tmp_path)
        assert "trims nothing from 9 updates" in caplog.text
        caplog.clear()
        _run_round(strategy, _global(), *_updates(10), tmp_path)
        assert caplog.text == ""
