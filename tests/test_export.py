"""Exported models (ONNX, TFLite float32 and int8) against Model.predict_proba on real feature tables.

The models are trained with the project's trainer on scikit-learn's breast cancer (binary) and wine (3 classes)
tables, exported once per module, and scored with onnxruntime and LiteRT through edge_runtime.inference.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from coordinator.export import ExportError, export_all, export_onnx, export_tflite, make_card
from edge_runtime.inference import (
    IncompatibleModelError,
    InferenceError,
    ModelCard,
    card_path,
    check_compatible,
    load_predictor,
)
from edge_runtime.model import Model, ModelSpec, Standardizer
from edge_runtime.trainer import TrainConfig, train

SPEC_HASH = "0123456789abcdef"
CASES = {
    "logreg-breast-cancer": (load_breast_cancer, ()),
    "mlp-breast-cancer": (load_breast_cancer, (16, 8)),
    "mlp-wine-3class": (load_wine, (16, 8)),
}


@dataclasses.dataclass
class Case:
    model: Model
    card: ModelCard
    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    paths: dict[str, Path]


def _train_case(name: str, out_dir: Path) -> Case:
    loader, hidden = CASES[name]
    data = loader()
    X, y = data.data, data.target
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=0)
    spec = ModelSpec(X.shape[1], hidden, int(y.max()) + 1)
    model = Model.create(spec, seed=1, standardizer=Standardizer.fit(X_train))
    model = train(model, X_train, y_train, TrainConfig(epochs=40, learning_rate=0.01, l2=1e-3)).model
    columns = [str(c).replace(" ", "_") for c in data.feature_names]
    card = make_card(
        model,
        name=name,
        feature_spec_hash=SPEC_HASH,
        columns=columns,
        units=[None] * len(columns),
        rounds=7,
        metrics={"auroc": 0.99, "n_test": float(len(y_test))},
    )
    paths = export_all(model, card, out_dir, representative=X_train)
    return Case(model, card, X.astype(np.float32), y, X_test.astype(np.float32), y_test, paths)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    out = tmp_path_factory.mktemp("export")
    return {name: _train_case(name, out) for name in CASES}


def _auroc(y: np.ndarray, proba: np.ndarray) -> float:
    if proba.shape[1] == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    # int8 softmax outputs are multiples of 1/256 and need not sum to exactly 1, which sklearn insists on.
    return float(roc_auc_score(y, proba / proba.sum(axis=1, keepdims=True), multi_class="ovr"))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_float_artifacts_match_model(cases: dict[str, Case], name: str, kind: str) -> None:
    case = cases[name]
    predictor = load_predictor(case.paths[kind])
    expected = case.model.predict_proba(case.X)
    got = predictor.predict_proba(case.X)
    assert got.shape == (len(case.X), case.model.spec.n_classes) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert predictor.backend == ("onnxruntime" if kind == "onnx" else "litert")


@pytest.mark.parametrize("kind", ["onnx", "tflite", "tflite_int8"])
def test_single_rows_and_batches_agree(cases: dict[str, Case], kind: str) -> None:
    """LiteRT resizes its input tensor between calls; a row must score the same alone and in a batch."""
    case = cases["mlp-wine-3class"]
    predictor = load_predictor(case.paths[kind])
    batch = predictor.predict_proba(case.X)
    singles = np.vstack([predictor.predict_proba(case.X[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(singles, batch[:5], atol=1e-6, rtol=0)
    np.testing.assert_allclose(predictor.predict_proba(case.X[:17]), batch[:17], atol=1e-6, rtol=0)
    assert predictor.predict_proba(case.X[:0]).shape == (0, 3)


@pytest.mark.parametrize("name", CASES)
def test_int8_tflite_agrees_with_model(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    predictor = load_predictor(case.paths["tflite_int8"])
    got = predictor.predict_proba(case.X)
    expected = case.model.predict_proba(case.X)
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    assert agreement >= 0.99, agreement
    delta = _auroc(case.y_test, predictor.predict_proba(case.X_test)) - _auroc(
        case.y_test, case.model.predict_proba(case.X_test)
    )
    assert abs(delta) <= 0.01, delta
    # Dequantized outputs are probabilities at int8 resolution, not something else (e.g. raw int8 codes).
    assert got.min() >= 0 and got.max() <= 1
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=0.02)


def test_int8_card_records_tensor_quantization(cases: dict[str, Case]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    case = cases["mlp-breast-cancer"]
    card = ModelCard.from_json(card_path(case.paths["tflite_int8"]).read_text())
    q = card.input_quantization
    assert q is not None and card.precision == "int8"
    interpreter = Interpreter(model_path=str(case.paths["tflite_int8"]))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert (q.scale, q.zero_point) == pytest.approx(inp["quantization"])
    assert (q.output_scale, q.output_zero_point) == pytest.approx(out["quantization"])
    np.testing.assert_allclose(q.mean, case.model.standardizer.mean)
    np.testing.assert_allclose(q.std, case.model.standardizer.scale)


@pytest.mark.parametrize("name", CASES)
def test_onnx_graph_is_valid_and_plain(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    proto = onnx.load(case.paths["onnx"])
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    assert {n.op_type for n in proto.graph.node} <= {"MatMul", "Add", "Relu", "Sigmoid", "Softmax"}
    (inp,), (out,) = proto.graph.input, proto.graph.output
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert (inp.name, in_dims) == ("features", ["N", case.model.spec.n_features])
    assert (out.name, out_dims) == ("probabilities", ["N", case.model.spec.n_classes])
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_metadata_round_trips(cases: dict[str, Case]) -> None:
    case = cases["mlp-wine-3class"]
    expected = dataclasses.asdict(case.card)
    onnx_card = load_predictor(case.paths["onnx"]).card
    tflite_card = ModelCard.from_json(card_path(case.paths["tflite"]).read_text())
    for card, fmt in ((onnx_card, "onnx"), (tflite_card, "tflite")):
        got = dataclasses.asdict(card)
        assert (got.pop("artifact_format"), got.pop("precision")) == (fmt, "float32")
        got.pop("artifact_sha256")
        base = {k: v for k, v in expected.items() if k not in ("artifact_format", "precision", "artifact_sha256")}
        assert got == base
    assert onnx_card.model_version == case.model.version() and onnx_card.rounds == 7
    assert onnx_card.metrics == {"auroc": 0.99, "n_test": float(len(case.y_test))}
    assert tflite_card.artifact_sha256 and ModelCard.from_json(tflite_card.to_json()) == tflite_card
    int8_card = ModelCard.from_json(card_path(case.paths["tflite_int8"]).read_text())
    assert ModelCard.from_json(int8_card.to_json()) == int8_card and int8_card.input_quantization is not None
    meta = {p.key: p.value for p in onnx.load(case.paths["onnx"]).metadata_props}
    assert meta["feature_spec_hash"] == SPEC_HASH and json.loads(meta["columns"]) == case.card.columns


def test_incompatible_model_is_refused(cases: dict[str, Case]) -> None:
    case = cases["mlp-breast-cancer"]
    card = load_predictor(case.paths["tflite"]).card
    columns = list(card.columns)
    check_compatible(card, SPEC_HASH, columns)  # the matching device passes

    with pytest.raises(IncompatibleModelError) as exc:
        check_compatible(card, "ffffffffffffffff", columns)
    assert exc.value.code == "FHAI-I010" and SPEC_HASH in exc.value.message and "ffffffffffffffff" in exc.value.message

    meta = {p.key: p.value for p in onnx.load(case.paths["onnx"]).metadata_props}
    with pytest.raises(IncompatibleModelError) as exc:
        check_compatible(meta, SPEC_HASH, [*columns[:-1], "bmi"])
    assert exc.value.code == "FHAI-I011" and "bmi" in exc.value.message and columns[-1] in exc.value.message

    with pytest.raises(IncompatibleModelError) as exc:
        check_compatible(card, SPEC_HASH, [columns[1], columns[0], *columns[2:]])
    assert exc.value.code == "FHAI-I011" and "order" in exc.value.message


def test_tampered_artifacts_are_refused(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["logreg-breast-cancer"]
    for key in ("tflite", "tflite_card", "tflite_int8", "tflite_int8_card"):
        (tmp_path / case.paths[key].name).write_bytes(case.paths[key].read_bytes())
    model = tmp_path / case.paths["tflite"].name
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(InferenceError) as exc:
        load_predictor(model)
    assert exc.value.code == "FHAI-I009"

    # An int8 card whose quantization disagrees with the tensor's belongs to another conversion.
    int8 = tmp_path / case.paths["tflite_int8"].name
    card = json.loads(card_path(int8).read_text())
    card["input_quantization"]["scale"] *= 2
    card_path(int8).write_text(json.dumps(card))
    with pytest.raises(InferenceError) as exc:
        load_predictor(int8)
    assert exc.value.code == "FHAI-I008"

    card_path(int8).unlink()
    with pytest.raises(InferenceError) as exc:
        load_predictor(int8)
    assert exc.value.code == "FHAI-I002"


def test_card_format_is_checked() -> None:
    card = ModelCard("m", "v", {"n_features": 2, "hidden": [], "n_classes": 2}, "h", ["a", "b"], ["mg/dL", None])
    assert ModelCard.from_json(card.to_json()) == card
    assert ModelCard.from_metadata(card.to_metadata()) == card
    with pytest.raises(InferenceError) as exc:
        ModelCard.from_dict({**card.to_dict(), "format_version": 99})
    assert exc.value.code == "FHAI-I004"
    with pytest.raises(InferenceError) as exc:
        ModelCard.from_dict({**card.to_dict(), "surprise": 1})
    assert exc.value.code == "FHAI-I003"
    with pytest.raises(InferenceError) as exc:
        ModelCard.from_json("[1, 2]")
    assert exc.value.code == "FHAI-I003"


def test_bad_features_are_refused(cases: dict[str, Case]) -> None:
    case = cases["mlp-breast-cancer"]
    predictor = load_predictor(case.paths["onnx"])
    with pytest.raises(InferenceError) as exc:
        predictor.predict_proba(case.X[:, :-1])
    assert exc.value.code == "FHAI-I006"
    X = case.X[:3].copy()
    X[1, 4] = np.nan
    with pytest.raises(InferenceError) as exc:
        predictor.predict_proba(X)
    assert exc.value.code == "FHAI-I007" and case.card.columns[4] in exc.value.message


def test_export_refuses_card_of_another_model(cases: dict[str, Case]) -> None:
    case = cases["mlp-wine-3class"]
    other = case.model.copy()
    other.params[0] += 1.0
    with pytest.raises(ExportError) as exc:
        export_onnx(other, case.card)
    assert exc.value.code == "FHAI-X001"
    with pytest.raises(ExportError) as exc:
        export_tflite(case.model, case.card, representative=None, int8=True)
    assert exc.value.code == "FHAI-X003"


def test_edge_side_scores_without_tensorflow(cases: dict[str, Case], tmp_path: Path) -> None:
    """The edge runtime must run where tensorflow is not installed: score in a process that never imports it."""
    case = cases["mlp-breast-cancer"]
    np.save(tmp_path / "X.npy", case.X[:50])
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        from edge_runtime.inference import load_predictor
        X = np.load({str(tmp_path / "X.npy")!r})
        out = [load_predictor(p).predict_proba(X) for p in ({str(case.paths["onnx"])!r}, {str(case.paths["tflite"])!r})]
        np.save({str(tmp_path / "out.npy")!r}, np.stack(out))
        assert "tensorflow" not in sys.modules and "coordinator" not in sys.modules, "edge side imported tensorflow"
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    out = np.load(tmp_path / "out.npy")
    expected = case.model.predict_proba(case.X[:50])
    np.testing.assert_allclose(out[0], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1], expected, atol=1e-5, rtol=0)
