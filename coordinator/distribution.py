"""Shipping the global model back to the bedside: export it (ONNX, TFLite float and int8) with its card.

The int8 export needs representative rows to calibrate its ranges, and the coordinator has no patient
rows by design. It draws them from the federated feature moments instead: standard-normal points in
the standardized space, mapped back to raw units by the model's own standardizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from coordinator.export import Artifact, export_onnx, export_tflite, make_card
from edge_runtime.inference import ModelCard
from edge_runtime.model import Model

ArtifactFormat = Literal["onnx", "tflite", "tflite_int8"]
CALIBRATION_ROWS = 512


def synthetic_representative(model: Model, rows: int = CALIBRATION_ROWS, seed: int = 0) -> np.ndarray:
    """Raw-unit rows whose standardized values are N(0, 1), clipped at 4 sigma."""
    z = np.clip(np.random.default_rng(seed).standard_normal((rows, model.spec.n_features)), -4.0, 4.0)
    return (model.standardizer.mean + z * model.standardizer.scale).astype(np.float32)


def build_artifacts(
    model: Model,
    formats: list[ArtifactFormat],
    *,
    name: str,
    feature_spec_hash: str,
    columns: list[str],
    units: list[str | None],
    rounds: int,
    metrics: dict[str, float] | None = None,
) -> dict[str, Artifact]:
    """One artifact per requested format, each with a card naming the spec, columns, version and metrics."""
    card = make_card(
        model,
        name=name,
        feature_spec_hash=feature_spec_hash,
        columns=columns,
        units=units,
        rounds=rounds,
        metrics=metrics,
    )
    return {fmt: EXPORTERS[fmt](model, card) for fmt in formats}


EXPORTERS: dict[str, Callable[[Model, ModelCard], Artifact]] = {
    "onnx": export_onnx,
    "tflite": export_tflite,
    "tflite_int8": lambda model, card: export_tflite(model, card, synthetic_representative(model), int8=True),
}
