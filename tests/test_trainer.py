"""The on-device model and Numba trainer, against finite differences, numpy and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from edge_runtime import kernels
from edge_runtime.errors import ModelError, TrainingDataError
from edge_runtime.model import Model, ModelSpec, Standardizer
from edge_runtime.trainer import TrainConfig, class_weights, objective, train
from tests.reference import batch_loss_grads, train_reference, unpack

SPECS = [
    ModelSpec(6),  # logistic regression
    ModelSpec(6, n_classes=3),  # multinomial logistic regression
    ModelSpec(6, (8,)),
    ModelSpec(6, (8, 5), n_classes=4),
]


def _data(spec: ModelSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, spec.n_features)) * 3 + 1
    w = rng.normal(size=(spec.n_features, spec.n_classes))
    y = np.argmax(X @ w + rng.gumbel(size=(n, spec.n_classes)), axis=1)
    return X, y


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.hidden}-k{s.n_classes}")
def test_gradient_matches_finite_differences(spec: ModelSpec) -> None:
    X, y = _data(spec, 40)
    model = Model.create(spec, seed=3, standardizer=Standardizer.fit(X))
    anchor = model.params + np.random.default_rng(1).normal(0, 0.1, model.params.shape).astype(np.float32)
    config = TrainConfig(l2=0.05, prox_mu=0.3, class_weight=[1.0 + i for i in range(spec.n_classes)])
    _, grad = objective(model, X, y, config, anchor, dtype=np.float64)

    layout = spec.layout()
    widths, w_off, b_off = layout.kernel_offsets()
    args = (
        model.standardizer.apply(X).astype(np.float64),
        y.astype(np.int64),
        class_weights(config, y, spec.n_classes),
        layout.weight_mask().astype(np.float64),
        config.l2,
        config.prox_mu,
        anchor.astype(np.float64),
    )
    theta = model.params.astype(np.float64)
    h = 1e-6
    numeric = np.empty_like(grad)
    for i in range(len(theta)):
        step = np.zeros_like(theta)
        step[i] = h
        plus, _ = kernels.loss_and_grad(theta + step, widths, w_off, b_off, *args)
        minus, _ = kernels.loss_and_grad(theta - step, widths, w_off, b_off, *args)
        numeric[i] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.hidden}-k{s.n_classes}")
def test_objective_matches_numpy_reference(spec: ModelSpec) -> None:
    X, y = _data(spec, 50, seed=4)
    model = Model.create(spec, seed=5, standardizer=Standardizer.fit(X))
    loss, grad = objective(model, X, y, TrainConfig(), dtype=np.float64)
    Ws, bs = unpack(model.params.astype(np.float64), spec.widths)
    ref_loss, gW, gb = batch_loss_grads(Ws, bs, model.standardizer.apply(X).astype(np.float64), y, np.ones(len(y)))
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    ref_grad = np.concatenate([g.ravel() for pair in zip(gW, gb, strict=True) for g in pair])
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.hidden}-k{s.n_classes}")
def test_numba_trainer_matches_numpy_reference(spec: ModelSpec, optimizer: str) -> None:
    X, y = _data(spec, 203, seed=7)  # 203 rows: every epoch ends with a short batch
    model = Model.create(spec, seed=11, standardizer=Standardizer.fit(X))
    anchor = model.params * 0.5
    config = TrainConfig(
        epochs=4,
        batch_size=16,
        optimizer=optimizer,  # type: ignore[arg-type]
        learning_rate=0.01,
        momentum=0.8,
        l2=0.01,
        prox_mu=0.1,
        class_weight="balanced",
        seed=42,
    )
    result = train(model, X, y, config, global_params=anchor)
    expected = train_reference(
        model.params,
        spec.widths,
        model.standardizer.apply(X),
        y,
        epochs=4,
        batch_size=16,
        optimizer=optimizer,
        lr=0.01,
        momentum=0.8,
        l2=0.01,
        mu=0.1,
        class_weight=class_weights(config, y, spec.n_classes).astype(np.float32),
        seed=42,
        anchor=anchor,
    )
    moved = np.abs(expected - model.params).max()
    assert moved > 1e-2, "the reference did not train: the comparison would be vacuous"
    np.testing.assert_allclose(result.model.params, expected, atol=2e-5 * max(1.0, moved), rtol=1e-4)


def test_training_is_seeded_and_leaves_the_input_model_alone() -> None:
    spec = ModelSpec(6, (8,))
    X, y = _data(spec, 100)
    model = Model.create(spec, seed=0, standardizer=Standardizer.fit(X))
    before = model.params.copy()
    a = train(model, X, y, TrainConfig(epochs=3, seed=1)).model.params
    b = train(model, X, y, TrainConfig(epochs=3, seed=1)).model.params
    c = train(model, X, y, TrainConfig(epochs=3, seed=2)).model.params
    np.testing.assert_array_equal(model.params, before)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_training_lowers_the_loss() -> None:
    spec = ModelSpec(6, (16,), n_classes=3)
    X, y = _data(spec, 600)
    model = Model.create(spec, seed=0, standardizer=Standardizer.fit(X))
    config = TrainConfig(epochs=20, learning_rate=0.01)
    before, _ = objective(model, X, y, config)
    result = train(model, X, y, config)
    after, _ = objective(result.model, X, y, config)
    assert after < 0.7 * before
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_logistic_regression_matches_scikit_learn_on_breast_cancer() -> None:
    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    scaler = Standardizer.fit(Xtr)
    ours = train(
        Model.create(ModelSpec(X.shape[1]), seed=0, standardizer=scaler),
        Xtr,
        ytr,
        TrainConfig(epochs=60, learning_rate=0.005, l2=1.0 / len(ytr)),  # sklearn's C=1 as a mean-loss penalty
    ).model
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.apply(Xtr), ytr)
    auc_ours = roc_auc_score(yte, ours.predict_proba(Xte)[:, 1])
    auc_sk = roc_auc_score(yte, sk.predict_proba(scaler.apply(Xte))[:, 1])
    assert auc_ours >= auc_sk - 0.01, (auc_ours, auc_sk)


def test_param_views_write_through_to_the_flat_vector() -> None:
    spec = ModelSpec(4, (3,), n_classes=5)
    model = Model.create(spec, seed=0)
    layout = spec.layout()
    assert layout.size == 4 * 3 + 3 + 3 * 5 + 5 == model.params.size
    assert [e.name for e in layout.entries] == ["W0", "b0", "W1", "b1"]
    model.views()["b1"][2] = 7.0
    assert model.params[layout.entries[3].offset + 2] == 7.0
    assert model.views()["W1"].shape == (3, 5)


def test_version_names_the_parameters_and_standardization() -> None:
    model = Model.create(ModelSpec(4), seed=0)
    same = model.copy()
    assert model.version() == same.version()
    same.params[0] += 1e-3
    assert model.version() != same.version()
    other = model.copy()
    other.standardizer.mean[0] = 1.0
    assert model.version() != other.version()


def test_predict_proba_rows_sum_to_one() -> None:
    X, _ = _data(ModelSpec(6, n_classes=4), 30)
    for spec in SPECS:
        p = Model.create(spec, seed=1).predict_proba(X)
        assert p.shape == (30, spec.n_classes)
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-12)


def test_standardizer_from_moments_equals_fit_on_pooled_rows() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(i, i + 1, size=(50 * (i + 1), 3)) for i in range(3)]
    pooled = Standardizer.fit(np.vstack(parts))
    merged = Standardizer.from_moments(
        sum(len(p) for p in parts), sum(p.sum(0) for p in parts), sum((p**2).sum(0) for p in parts)
    )
    np.testing.assert_allclose(merged.mean, pooled.mean, rtol=1e-6)
    np.testing.assert_allclose(merged.scale, pooled.scale, rtol=1e-6)
    np.testing.assert_allclose(pooled.mean, np.vstack(parts).mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled.scale, np.vstack(parts).std(0), rtol=1e-5)


@pytest.mark.parametrize(
    ("X", "y", "code"),
    [
        (np.zeros((0, 6)), np.zeros(0), "FHAI-T002"),
        (np.zeros(6), np.zeros(1), "FHAI-T001"),
        (np.zeros((5, 4)), np.zeros(5), "FHAI-T003"),
        (np.zeros((5, 6)), np.zeros(4), "FHAI-T004"),
        (np.where(np.eye(5, 6) > 0, np.nan, 0.0), np.zeros(5), "FHAI-T005"),
        (np.full((5, 6), np.inf), np.zeros(5), "FHAI-T005"),
        (np.zeros((5, 6)), np.array([0, 1, 2, 0, 1]), "FHAI-T007"),
        (np.zeros((5, 6)), np.array([0, -1, 0, 0, 1]), "FHAI-T007"),
        (np.zeros((5, 6)), np.array([0, 0.5, 0, 0, 1]), "FHAI-T006"),
    ],
    ids=[
        "empty",
        "1d",
        "columns",
        "label-count",
        "nan",
        "inf",
        "class-too-big",
        "negative-class",
        "fractional",
    ],
)
def test_bad_training_data_is_refused_with_a_code(X: np.ndarray, y: np.ndarray, code: str) -> None:
    model = Model.create(ModelSpec(6), seed=0)
    with pytest.raises(TrainingDataError) as info:
        train(model, X, y, TrainConfig(epochs=1))
    assert info.value.code == code
    assert str(info.value).startswith(f"[{code}]")


def test_bad_specs_and_configs_are_refused() -> None:
    with pytest.raises(ModelError):
        ModelSpec(0)
    with pytest.raises(ModelError):
        ModelSpec(3, (4, 0))
    with pytest.raises(ModelError):
        ModelSpec(3, n_classes=1)
    with pytest.raises(ModelError):
        Model(ModelSpec(3), np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=-1)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch"):
        TrainConfig(epochs=0)


def test_divergence_is_reported_not_returned() -> None:
    spec = ModelSpec(6, (8,))
    X, y = _data(spec, 64)
    with pytest.raises(TrainingDataError, match="lower the learning rate"):
        train(Model.create(spec, seed=0), X * 1e30, y, TrainConfig(epochs=5, optimizer="sgd", learning_rate=10))
