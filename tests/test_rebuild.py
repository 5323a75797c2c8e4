"""Float exports rebuilt on the device from the parameters it holds, checked against fresh exports and runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.artifact_delivery import artifact_frames, improved, plan_skeleton
from coordinator.export import export_onnx, export_tflite, make_card
from edge_runtime.inference import LiteRTPredictor, ModelCard, OnnxPredictor
from edge_runtime.model import Model, ModelSpec, Standardizer
from edge_runtime.rebuild import Hole, RebuildError, export_arrays, fill_holes, folded_layers, rebuild_artifact

SPECS = [ModelSpec(9, (), 2), ModelSpec(12, (64, 32), 2), ModelSpec(12, (16,), 3)]


def model_for(spec: ModelSpec, seed: int = 1) -> Model:
    rng = np.random.default_rng(seed)
    std = Standardizer(
        rng.normal(size=spec.n_features).astype(np.float32), rng.uniform(0.5, 3, spec.n_features).astype(np.float32)
    )
    return Model(spec, (rng.normal(size=spec.layout().size) * 0.3).astype(np.float32), std)


def card_for(model: Model) -> ModelCard:
    columns = [f"c{i}" for i in range(model.spec.n_features)]
    return make_card(
        model, name="t", feature_spec_hash="h" * 16, columns=columns, units=[None] * len(columns), rounds=4
    )


EXPORTERS = {"onnx": lambda m: export_onnx(m, card_for(m)), "tflite": lambda m: export_tflite(m, card_for(m))}


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_rebuilt_float_export_is_byte_for_byte_the_fresh_export(fmt: str, spec: ModelSpec) -> None:
    model = model_for(spec)
    fresh = EXPORTERS[fmt](model)
    skeleton = plan_skeleton(model, fresh.data, lambda m: EXPORTERS[fmt](m).data)
    assert skeleton is not None
    assert {h.name for h in skeleton.holes} == set(export_arrays(model))  # every weight travels as a hole
    # The device side: the skeleton and the parameters it holds, nothing else.
    data = rebuild_artifact(skeleton.packed, skeleton.holes, model.copy(), fresh.card.artifact_sha256)
    assert data == fresh.data
    X = np.random.default_rng(2).normal(size=(50, spec.n_features)) * 2
    predictor = OnnxPredictor(data) if fmt == "onnx" else LiteRTPredictor(data, fresh.card)
    np.testing.assert_allclose(predictor.predict_proba(X), model.predict_proba(X), atol=1e-5)
    if spec.layout().size > 2000:  # the skeleton is metadata and structure: it does not grow with the weights
        assert len(skeleton.packed) < 0.1 * len(fresh.data)


def test_a_device_holding_another_model_cannot_pass_off_its_rebuild() -> None:
    model = model_for(SPECS[1])
    fresh = EXPORTERS["onnx"](model)
    skeleton = plan_skeleton(model, fresh.data, lambda m: EXPORTERS["onnx"](m).data)
    assert skeleton is not None
    other = Model(model.spec, model.params + np.float32(1e-3), model.standardizer)
    with pytest.raises(RebuildError) as err:
        rebuild_artifact(skeleton.packed, skeleton.holes, other, fresh.card.artifact_sha256)
    assert err.value.code == "FHAI-L813"
    with pytest.raises(RebuildError) as err:
        rebuild_artifact(b"not zstd", skeleton.holes, model, fresh.card.artifact_sha256)
    assert err.value.code == "FHAI-L812"


def test_holes_must_be_zeroed_disjoint_in_bounds_and_named() -> None:
    arrays = {"W0": np.ones((2, 2), np.float32), "b0": np.ones(2, np.float32)}
    skeleton = bytes(40)
    assert (
        fill_holes(skeleton, [Hole(offset=0, name="W0"), Hole(offset=16, name="b0")], arrays)[:24]
        == np.ones(6, "<f4").tobytes()
    )
    for holes, data in (
        ([Hole(offset=0, name="W0"), Hole(offset=8, name="b0")], skeleton),  # overlap
        ([Hole(offset=36, name="b0")], skeleton),  # past the end
        ([Hole(offset=0, name="W9")], skeleton),  # unknown array
        ([Hole(offset=0, name="b0")], b"\x01" + skeleton[1:]),  # the skeleton holds bytes where the hole is
    ):
        with pytest.raises(RebuildError) as err:
            fill_holes(data, holes, arrays)
        assert err.value.code == "FHAI-L811"


def test_folding_without_blas_matches_the_float64_formula() -> None:
    model = model_for(SPECS[1])
    W0, b0 = folded_layers(model)[0]
    v = model.views()
    mean, scale = model.standardizer.mean.astype(np.float64), model.standardizer.scale.astype(np.float64)
    np.testing.assert_allclose(b0, v["b0"] - (mean / scale) @ v["W0"].astype(np.float64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(W0, v["W0"] / scale[:, None], rtol=1e-6)


def test_float_formats_ship_a_skeleton_and_int8_the_whole_artifact() -> None:
    model = model_for(SPECS[0])
    fields = {"name": "t", "feature_spec_hash": "h" * 16, "columns": [f"c{i}" for i in range(9)], "units": [None] * 9}
    outs = artifact_frames(model, ["onnx", "tflite_int8"], task="t", round_no=3, reason="end", card_fields=fields)
    assert [(o.fmt, o.full, o.header["delivery"]) for o in outs] == [
        ("onnx", True, "full"),
        ("onnx", False, "rebuild"),
        ("tflite_int8", False, "full"),
    ]
    assert all(o.header["round"] == 3 and o.header["card"]["rounds"] == 3 for o in outs)  # the card names the round
    assert outs[1].body != outs[0].body and len(outs[1].body) < len(outs[0].body)


def test_an_export_on_improvement_needs_a_better_pooled_auroc_than_every_earlier_model() -> None:
    pooled = {0: 0.5, 1: 0.7, 2: 0.69, 3: 0.71, 4: float("nan")}
    assert improved(pooled, 1)  # the first trained model
    assert not improved(pooled, 0)  # the random initial model is never exported for improving
    assert not improved(pooled, 2)
    assert improved(pooled, 3)
    assert not improved(pooled, 4) and not improved(pooled, 5)
