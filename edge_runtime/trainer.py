"""Local training: checks the data, standardizes it, and runs the Numba kernels over whole epochs."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.errors import TrainingDataError
from edge_runtime.model import Model, ModelSpec

log = logging.getLogger("fhai.edge")


class TrainConfig(BaseModel):
    """How a device trains in one round. Device profiles and round announcements carry these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(5, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam"] = "adam"
    learning_rate: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (heavy ball)")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-7, gt=0)
    l2: float = Field(0.0, ge=0, description="(l2/2)*||W||^2 on weights, not biases")
    prox_mu: float = Field(0.0, ge=0, description="FedProx: (mu/2)*||w - w_global||^2")
    class_weight: Literal["balanced"] | list[float] | None = None
    seed: int = 0


@dataclass
class TrainResult:
    model: Model
    epoch_losses: np.ndarray
    n_samples: int


def check_training_data(model: Model, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (X float32 C-contiguous, y int64), or raise TrainingDataError saying what is wrong."""
    X = np.asarray(X)
    y = np.asarray(y)
    spec = model.spec
    if X.ndim != 2:
        raise TrainingDataError("FHAI-T001", f"features must be a 2-D matrix (rows x columns), got shape {X.shape}")
    if X.shape[0] == 0:
        raise TrainingDataError(
            "FHAI-T002", "no training rows: check the FHIR source and the feature spec's cohort filter"
        )
    if X.shape[1] != spec.n_features:
        raise TrainingDataError(
            "FHAI-T003",
            f"features have {X.shape[1]} columns but the model expects {spec.n_features}: "
            "the device's feature spec does not match the task's",
        )
    if y.shape != (X.shape[0],):
        raise TrainingDataError("FHAI-T004", f"labels have shape {y.shape}, expected ({X.shape[0]},) to match the rows")
    Xf = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(Xf).all():
        bad_cols = np.flatnonzero(~np.isfinite(Xf).all(axis=0)).tolist()
        raise TrainingDataError(
            "FHAI-T005",
            f"features contain NaN or infinite values in columns {bad_cols}: impute missing values first "
            "(the feature builder adds indicator columns)",
        )
    if not np.isfinite(y.astype(np.float64, copy=False)).all() or not np.all(np.mod(y, 1) == 0):
        raise TrainingDataError("FHAI-T006", "labels must be whole class numbers")
    yi = y.astype(np.int64)
    outside = (yi < 0) | (yi >= spec.n_classes)
    if outside.any():
        raise TrainingDataError(
            "FHAI-T007",
            f"labels {sorted(set(yi[outside].tolist()))[:5]} are outside the classes 0..{spec.n_classes - 1}",
        )
    return Xf, yi


def class_weights(config: TrainConfig, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class loss weights: none, 'balanced' (n / (k * count), as scikit-learn), or explicit."""
    if config.class_weight is None:
        return np.ones(n_classes, np.float64)
    if config.class_weight == "balanced":
        counts = np.bincount(y, minlength=n_classes).astype(np.float64)
        return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    weights = np.asarray(config.class_weight, np.float64)
    if weights.shape != (n_classes,) or (weights < 0).any():
        raise TrainingDataError(
            "FHAI-T008", f"class_weight needs {n_classes} non-negative numbers, got {config.class_weight}"
        )
    return weights


def epoch_permutations(seed: int, epochs: int, n: int) -> np.ndarray:
    """Each epoch's row order, from the seed alone: the same seed trains the same model."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(epochs)]).astype(np.int64)


def train(
    model: Model,
    X: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    global_params: np.ndarray | None = None,
) -> TrainResult:
    """Train a copy of `model` on raw features X and labels y; the input model is left untouched.

    `global_params` anchors the FedProx term (defaults to the starting parameters).
    """
    from edge_runtime import kernels  # numba loads on the first training, not when a TrainConfig is read

    Xf, yi = check_training_data(model, X, y)
    out = model.copy()
    theta = out.params
    anchor = np.ascontiguousarray(theta.copy() if global_params is None else global_params, dtype=np.float32)
    if anchor.shape != theta.shape:
        raise TrainingDataError(
            "FHAI-T009", f"global parameters have shape {anchor.shape}, the model has {theta.shape}"
        )
    layout = model.spec.layout()
    widths, w_off, b_off = layout.kernel_offsets()
    losses = kernels.train_epochs(
        theta,
        widths,
        w_off,
        b_off,
        Xf,  # standardized row by row inside the kernel (no copy of the table)
        np.ascontiguousarray(out.standardizer.mean),
        np.ascontiguousarray(out.standardizer.scale),
        yi,
        class_weights(config, yi, model.spec.n_classes).astype(np.float32),
        layout.weight_mask(),
        epoch_permutations(config.seed, config.epochs, len(yi)),
        config.batch_size,
        kernels.OPT_ADAM if config.optimizer == "adam" else kernels.OPT_SGD,
        np.float32(config.learning_rate),
        np.float32(config.momentum),
        np.float32(config.beta1),
        np.float32(config.beta2),
        np.float32(config.eps),
        np.float32(config.l2),
        np.float32(config.prox_mu),
        anchor,
    )
    if not np.isfinite(theta).all():
        raise TrainingDataError(
            "FHAI-T010",
            "training diverged (non-finite parameters): lower the learning rate in the device profile",
        )
    return TrainResult(out, losses, len(yi))


def objective(
    model: Model,
    X: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    global_params: np.ndarray | None = None,
    dtype: type[np.floating] = np.float32,
) -> tuple[float, np.ndarray]:
    """The full-batch objective the trainer minimises and its gradient, at the model's parameters."""
    from edge_runtime import kernels

    Xf, yi = check_training_data(model, X, y)
    layout = model.spec.layout()
    widths, w_off, b_off = layout.kernel_offsets()
    theta = model.params.astype(dtype)
    anchor = theta.copy() if global_params is None else np.asarray(global_params, dtype)
    loss, grad = kernels.loss_and_grad(
        theta,
        widths,
        w_off,
        b_off,
        np.ascontiguousarray(model.standardizer.apply(Xf), dtype=dtype),
        yi,
        class_weights(config, yi, model.spec.n_classes).astype(dtype),
        layout.weight_mask().astype(dtype),
        dtype(config.l2),
        dtype(config.prox_mu),
        anchor,
    )
    return float(loss), grad


def warm_up() -> None:
    """Load (or compile) the training kernels: one tiny run has the argument types of every real one."""
    X = np.zeros((2, 1), np.float32)
    train(Model.create(ModelSpec(1)), X, np.array([0, 1]), TrainConfig(epochs=1, batch_size=2))


def warm_up_in_background() -> threading.Thread:
    """Start `warm_up` in a daemon thread, so Numba's import and cache load overlap the device's I/O
    (broker connection, FHIR sync) instead of delaying its first trained batch; `train` waits for it."""

    def run() -> None:
        try:
            warm_up()
        except Exception:  # the first real train() will raise the same problem where it can be handled
            log.debug("kernel warm-up failed", exc_info=True)

    thread = threading.Thread(target=run, name="kernel-warm-up", daemon=True)
    thread.start()
    return thread
