"""The on-device model: a spec, a flat float32 parameter vector with named views, and standardization.

Every parameter lives in one contiguous float32 vector so the codec, the aggregators and the
optimizers all see a single array; `ParamLayout` gives each layer's weight and bias a name and
a view into it. Logistic regression is the MLP with no hidden layer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    """Architecture: `n_features` inputs, ReLU hidden layers, sigmoid (2 classes) or softmax output."""

    n_features: int
    hidden: tuple[int, ...] = ()
    n_classes: int = 2

    def __post_init__(self) -> None:
        if self.n_features < 1:
            raise ModelError("FHAI-M001", f"n_features must be >= 1, got {self.n_features}")
        if self.n_classes < 2:
            raise ModelError("FHAI-M002", f"n_classes must be >= 2, got {self.n_classes}")
        if any(h < 1 for h in self.hidden):
            raise ModelError("FHAI-M003", f"hidden layer sizes must be >= 1, got {self.hidden}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    @property
    def n_outputs(self) -> int:
        """One logit for a binary task, one per class otherwise."""
        return 1 if self.n_classes == 2 else self.n_classes

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.n_features, *self.hidden, self.n_outputs)

    @property
    def kind(self) -> str:
        return "mlp" if self.hidden else "logreg"

    def layout(self) -> ParamLayout:
        return ParamLayout.for_widths(self.widths)

    def to_dict(self) -> dict[str, object]:
        return {"n_features": self.n_features, "hidden": list(self.hidden), "n_classes": self.n_classes}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ModelSpec:
        try:
            hidden = d.get("hidden", [])
            assert isinstance(hidden, list | tuple)
            return cls(int(d["n_features"]), tuple(int(h) for h in hidden), int(d.get("n_classes", 2)))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise ModelError("FHAI-M004", f"invalid model spec {d!r}: {exc}") from exc


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class ParamLayout:
    """Where each named tensor sits in the flat vector: W0, b0, W1, b1, ... (W is fan_in x fan_out)."""

    entries: tuple[ParamEntry, ...]
    widths: tuple[int, ...]

    @classmethod
    def for_widths(cls, widths: tuple[int, ...]) -> ParamLayout:
        entries = []
        offset = 0
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            entries.append(ParamEntry(f"W{i}", (fan_in, fan_out), offset))
            offset += fan_in * fan_out
            entries.append(ParamEntry(f"b{i}", (fan_out,), offset))
            offset += fan_out
        return cls(tuple(entries), widths)

    @property
    def size(self) -> int:
        last = self.entries[-1]
        return last.offset + last.size

    @property
    def n_layers(self) -> int:
        return len(self.widths) - 1

    def views(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Named views (no copies) into `theta`; writing to a view writes the vector."""
        if theta.shape != (self.size,):
            raise ModelError("FHAI-M005", f"parameter vector has shape {theta.shape}, layout needs ({self.size},)")
        return {e.name: theta[e.offset : e.offset + e.size].reshape(e.shape) for e in self.entries}

    def weight_mask(self) -> np.ndarray:
        """1 where a parameter is a weight (L2 applies), 0 for biases."""
        mask = np.zeros(self.size, dtype=np.float32)
        for e in self.entries:
            if e.name.startswith("W"):
                mask[e.offset : e.offset + e.size] = 1.0
        return mask

    def kernel_offsets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(widths, weight offsets, bias offsets) as int64 arrays, the form the Numba kernels take."""
        w_off = np.array([e.offset for e in self.entries if e.name.startswith("W")], dtype=np.int64)
        b_off = np.array([e.offset for e in self.entries if e.name.startswith("b")], dtype=np.int64)
        return np.array(self.widths, dtype=np.int64), w_off, b_off


def init_params(spec: ModelSpec, seed: int) -> np.ndarray:
    """He-uniform weights for ReLU layers, Glorot-uniform for the output layer, zero biases."""
    rng = np.random.default_rng(seed)
    layout = spec.layout()
    theta = np.zeros(layout.size, dtype=np.float32)
    views = layout.views(theta)
    for i in range(layout.n_layers):
        fan_in, fan_out = layout.widths[i], layout.widths[i + 1]
        is_output = i == layout.n_layers - 1
        limit = np.sqrt(6.0 / (fan_in + fan_out)) if is_output else np.sqrt(6.0 / fan_in)
        views[f"W{i}"][...] = rng.uniform(-limit, limit, size=(fan_in, fan_out))
    return theta


@dataclass
class Standardizer:
    """Per-feature (x - mean) / scale. It travels with the model so every site scores the same way."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def identity(cls, n_features: int) -> Standardizer:
        return cls(np.zeros(n_features, np.float32), np.ones(n_features, np.float32))

    @classmethod
    def from_moments(cls, count: float, total: np.ndarray, total_sq: np.ndarray) -> Standardizer:
        """From sums over (possibly many sites') rows: what federated statistics deliver."""
        if count <= 0:
            raise ModelError("FHAI-M006", "cannot standardize from zero rows")
        mean = np.asarray(total, np.float64) / count
        var = np.maximum(np.asarray(total_sq, np.float64) / count - mean**2, 0.0)
        scale = np.sqrt(var)
        scale[scale < 1e-8] = 1.0  # a constant column stays as it is instead of dividing by zero
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        X64 = np.asarray(X, np.float64)
        return cls.from_moments(len(X64), X64.sum(0), (X64**2).sum(0))

    def apply(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float32) - self.mean) / self.scale).astype(np.float32, copy=False)


@dataclass
class Model:
    """A spec, its flat parameters and the input standardization that belongs to them."""

    spec: ModelSpec
    params: np.ndarray
    standardizer: Standardizer = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.params = np.ascontiguousarray(self.params, dtype=np.float32)
        expected = self.spec.layout().size
        if self.params.shape != (expected,):
            raise ModelError(
                "FHAI-M005",
                f"parameter vector has shape {self.params.shape}, {self.spec} needs ({expected},)",
            )
        if self.standardizer is None:
            self.standardizer = Standardizer.identity(self.spec.n_features)

    @classmethod
    def create(cls, spec: ModelSpec, seed: int = 0, standardizer: Standardizer | None = None) -> Model:
        return cls(spec, init_params(spec, seed), standardizer or Standardizer.identity(spec.n_features))

    def copy(self) -> Model:
        return Model(
            self.spec,
            self.params.copy(),
            Standardizer(self.standardizer.mean.copy(), self.standardizer.scale.copy()),
        )

    def views(self) -> dict[str, np.ndarray]:
        return self.spec.layout().views(self.params)

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Output-layer pre-activations for raw (unstandardized) features, in plain numpy."""
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.spec.n_features:
            raise ModelError(
                "FHAI-M007", f"features have shape {X.shape}, the model expects (n, {self.spec.n_features})"
            )
        a = self.standardizer.apply(X)
        v = self.views()
        n_layers = self.spec.layout().n_layers
        for i in range(n_layers):
            a = a @ v[f"W{i}"] + v[f"b{i}"]
            if i < n_layers - 1:
                a = np.maximum(a, 0.0)
        return a

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, n_classes); for a binary model column 1 is P(y=1)."""
        z = self.logits(X).astype(np.float64)
        if self.spec.n_outputs == 1:
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    def version(self) -> str:
        """Content hash of spec, parameters and standardization: names a global model on the wire."""
        h = hashlib.sha256(json.dumps(self.spec.to_dict(), sort_keys=True).encode())
        for arr in (self.params, self.standardizer.mean, self.standardizer.scale):
            h.update(np.ascontiguousarray(arr, np.float32).tobytes())
        return h.hexdigest()[:16]
