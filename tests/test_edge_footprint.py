"""The edge runtime installs and runs on a gateway without TensorFlow, and never reaches into the coordinator."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        # As if these were not installed: a gateway has neither.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "keras", "coordinator", "sqlalchemy", "matplotlib"):
                raise ImportError(f"{name} is not available on a gateway")
            return None

    sys.meta_path.insert(0, Block())
    import pkgutil, importlib
    import edge_runtime
    names = [m.name for m in pkgutil.walk_packages(edge_runtime.__path__, "edge_runtime.")]
    for name in names:
        importlib.import_module(name)
    import numpy as np
    from edge_runtime.model import Model, ModelSpec
    from edge_runtime.trainer import TrainConfig, train
    X = np.random.default_rng(0).normal(size=(64, 4)); y = (X[:, 0] > 0).astype(int)
    train(Model.create(ModelSpec(4, (8,))), X, y, TrainConfig(epochs=2))
    print("ok", len(names))
    """
)


def test_edge_runtime_imports_and_trains_without_tensorflow_or_coordinator() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
    assert int(done.stdout.split()[1]) >= 15  # every edge module was imported, not just the package
