"""Warm start: the training kernels load without scipy.linalg, give the same model as with it, and the
background warm-up prepares exactly the specialization real training uses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from edge_runtime import kernels
from edge_runtime.model import Model, ModelSpec, Standardizer
from edge_runtime.trainer import TrainConfig, train, warm_up_in_background

ROOT = Path(__file__).resolve().parents[1]

TRAIN = textwrap.dedent(
    """
    import sys
    if sys.argv[1] == "scipy-first":
        import scipy.linalg  # the usual import path of the BLAS bindings
    import numpy as np
    from edge_runtime.model import Model, ModelSpec, Standardizer
    from edge_runtime.trainer import TrainConfig, train
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    model = Model.create(ModelSpec(12, (24, 8)), 3, Standardizer.fit(X))  # widths that go through BLAS gemm
    out = train(model, X, y, TrainConfig(epochs=3, batch_size=32, seed=5)).model
    sys.stdout.write(out.params.tobytes().hex() + "\\n")
    sys.stdout.write(" ".join(sorted(m for m in sys.modules if m.startswith("scipy.linalg"))) + "\\n")
    """
)


def _train_in_child(mode: str) -> tuple[str, set[str]]:
    done = subprocess.run([sys.executable, "-c", TRAIN, mode], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    params, modules = done.stdout.splitlines()
    return params, set(modules.split())


def test_kernels_load_scipys_blas_bindings_alone_and_train_the_same_model() -> None:
    params, modules = _train_in_child("plain")
    assert modules == {"scipy.linalg.cython_blas"}  # not the scipy.linalg package (0.3 s of CPU at start)
    reference, modules_before = _train_in_child("scipy-first")
    assert "scipy.linalg._basic" in modules_before  # the full package, as Numba used to import it
    assert params == reference  # same BLAS, same bits


def test_background_warm_up_compiles_what_training_then_uses() -> None:
    warm_up_in_background().join(600)
    signatures = list(kernels.train_epochs.signatures)
    assert signatures
    X = np.random.default_rng(0).normal(size=(64, 5))
    y = (X[:, 0] > 0).astype(int)
    for hidden, optimizer in (((), "sgd"), ((8,), "adam")):
        model = Model.create(ModelSpec(5, hidden), 0, Standardizer.fit(X))
        train(model, X, y, TrainConfig(epochs=1, optimizer=optimizer))
    assert list(kernels.train_epochs.signatures) == signatures  # nothing new to compile after the warm-up
