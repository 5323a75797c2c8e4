"""Export a global model for on-device inference: ONNX (built with onnx.helper) and TFLite (float32, int8).

Every artifact maps raw features to class probabilities: the model's standardization is folded into the first
layer, so a device needs no preprocessing code that could drift from the trainer's. A binary model's single
logit z becomes the two columns [-z, z] before the sigmoid, which gives [1 - p, p] exactly as
`Model.predict_proba` does, with no extra ops.

The one exception is full-integer int8 TFLite: its input is quantized per tensor, and raw clinical columns
span several orders of magnitude, so the int8 graph takes standardized features and its card carries the mean,
std, scale and zero point the device applies (see `edge_runtime.inference.InputQuantization`).

TensorFlow is imported only inside the TFLite functions: it is the coordinator's dependency, slow to import,
and never needed on devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import EdgeError
from edge_runtime.inference import InputQuantization, ModelCard, save_model_files
from edge_runtime.model import Model
from edge_runtime.rebuild import Layers, folded_layers  # shared with devices that rebuild float exports

__all__ = [
    "Artifact",
    "ExportError",
    "InputQuantization",
    "ModelCard",
    "export_all",
    "export_onnx",
    "export_tflite",
    "folded_layers",
    "make_card",
]

ONNX_OPSET = 21
ONNX_IR_VERSION = 10  # the IR that goes with opset 21; older runtimes on devices refuse newer IRs
CALIBRATION_ROWS = 1000


class ExportError(EdgeError):
    """A model and card that do not fit together, or calibration data the int8 export cannot use."""


@dataclass(frozen=True)
class Artifact:
    """An exported model's bytes and its completed card (spec, version, sha256, quantization)."""

    data: bytes
    card: ModelCard
    suffix: str  # ".onnx", ".tflite" or ".int8.tflite"


def make_card(
    model: Model,
    *,
    name: str,
    feature_spec_hash: str,
    columns: list[str],
    units: list[str | None],
    rounds: int = 0,
    metrics: dict[str, float] | None = None,
) -> ModelCard:
    """A card for `model`; the exporters fill in the format, precision, sha256 and quantization."""
    return ModelCard(
        name=name,
        model_version=model.version(),
        spec=model.spec.to_dict(),
        feature_spec_hash=feature_spec_hash,
        columns=list(columns),
        units=list(units),
        rounds=rounds,
        metrics=dict(metrics or {}),
    )


def _checked_card(model: Model, card: ModelCard) -> None:
    if card.model_version != model.version() or card.spec != model.spec.to_dict():
        raise ExportError(
            "FHAI-X001",
            f"card {card.name!r} describes model {card.model_version} {card.spec}, not the one being exported "
            f"({model.version()} {model.spec.to_dict()}): build the card with make_card(model, ...)",
        )
    if len(card.columns) != model.spec.n_features:
        raise ExportError(
            "FHAI-X002",
            f"card lists {len(card.columns)} columns but the model has {model.spec.n_features} features: "
            "pass the feature table's column names",
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_onnx(model: Model, card: ModelCard) -> Artifact:
    """ONNX (opset 21): MatMul/Add/Relu ... Sigmoid or Softmax; input `features` [N, n_features] float32,
    output `probabilities` [N, n_classes]; the card's fields go into metadata_props. Passes the full checker."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    _checked_card(model, card)
    card = dataclasses.replace(card, artifact_format="onnx", precision="float32", artifact_sha256="")
    layers = folded_layers(model)
    nodes, inits = [], []
    x = "features"
    for i, (W, b) in enumerate(layers):
        inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"matmul{i}"]))
        nodes.append(helper.make_node("Add", [f"matmul{i}", f"b{i}"], [f"logits{i}"]))
        x = f"logits{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"]))
            x = f"relu{i}"
    if model.spec.n_outputs == 1:
        nodes.append(helper.make_node("Sigmoid", [x], ["probabilities"]))
    else:
        nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "fhai_model",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", model.spec.n_features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", model.spec.n_classes])],
        initializer=inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name="fhai",
        doc_string=f"FH-AI model {card.name} {card.model_version}: raw features in, class probabilities out",
    )
    helper.set_model_props(proto, card.to_metadata())
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    return Artifact(data, dataclasses.replace(card, artifact_sha256=_sha256(data)), ".onnx")


def _representative_rows(model: Model, representative: np.ndarray | None) -> np.ndarray:
    if representative is None:
        raise ExportError(
            "FHAI-X003",
            "int8 export needs representative rows to calibrate activation ranges: pass training features",
        )
    X = np.asarray(representative, np.float32)
    if X.ndim != 2 or X.shape[1] != model.spec.n_features or len(X) == 0:
        raise ExportError(
            "FHAI-X004",
            f"representative features have shape {X.shape}, the model expects (n >= 1, {model.spec.n_features})",
        )
    if not np.isfinite(X).all():
        raise ExportError("FHAI-X004", "representative features contain NaN or infinite values: impute them first")
    if len(X) > CALIBRATION_ROWS:  # calibration cost grows with rows; a seeded sample keeps exports reproducible
        X = X[np.random.default_rng(0).choice(len(X), CALIBRATION_ROWS, replace=False)]
    return model.standardizer.apply(X)


def _tflite_bytes(layers: Layers, sigmoid: bool, calibration: np.ndarray | None) -> bytes:
    """Build the network as a tf.function with constant weights and convert it (int8 when calibration is given)."""
    import tensorflow as tf

    consts = [(tf.constant(W), tf.constant(b)) for W, b in layers]
    n_features = layers[0][0].shape[0]

    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32, name="features")])
    def probabilities(features: Any) -> Any:
        a = features
        for i, (W, b) in enumerate(consts):
            a = tf.matmul(a, W) + b
            if i < len(consts) - 1:
                a = tf.nn.relu(a)
        return {"probabilities": tf.sigmoid(a) if sigmoid else tf.nn.softmax(a, axis=-1)}

    module.probabilities = probabilities
    converter = tf.lite.TFLiteConverter.from_concrete_functions([probabilities.get_concrete_function()], module)
    if calibration is not None:
        rows = calibration

        def representative_dataset() -> Iterator[list[np.ndarray]]:
            for start in range(0, len(rows), 32):
                yield [rows[start : start + 32]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def _tensor_quantization(data: bytes) -> tuple[float, int, float, int]:
    """(input scale, input zero point, output scale, output zero point) as the converter chose them."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data)
    (scale, zp) = interpreter.get_input_details()[0]["quantization"]
    (out_scale, out_zp) = interpreter.get_output_details()[0]["quantization"]
    return float(scale), int(zp), float(out_scale), int(out_zp)


def export_tflite(
    model: Model, card: ModelCard, representative: np.ndarray | None = None, int8: bool = False
) -> Artifact:
    """TFLite through TensorFlow's converter: float32 (raw features in), or full-integer int8 (int8 in and out,
    calibrated on `representative` raw training rows, standardized features in; see the module docstring)."""
    _checked_card(model, card)
    sigmoid = model.spec.n_outputs == 1
    if not int8:
        data = _tflite_bytes(folded_layers(model), sigmoid, None)
        out = dataclasses.replace(card, artifact_format="tflite", precision="float32", input_quantization=None)
        return Artifact(data, dataclasses.replace(out, artifact_sha256=_sha256(data)), ".tflite")
    calibration = _representative_rows(model, representative)
    data = _tflite_bytes(folded_layers(model, fold_standardization=False), sigmoid, calibration)
    scale, zp, out_scale, out_zp = _tensor_quantization(data)
    quant = InputQuantization(
        mean=model.standardizer.mean.astype(float).tolist(),
        std=model.standardizer.scale.astype(float).tolist(),
        scale=scale,
        zero_point=zp,
        output_scale=out_scale,
        output_zero_point=out_zp,
    )
    out = dataclasses.replace(
        card, artifact_format="tflite", precision="int8", input_quantization=quant, artifact_sha256=_sha256(data)
    )
    return Artifact(data, out, ".int8.tflite")


def write_artifact(artifact: Artifact, out_dir: str | Path) -> dict[str, Path]:
    """Write `<name><suffix>`, and for TFLite its `<name>[.int8].card.json` beside it."""
    return save_model_files(artifact.data, artifact.card, artifact.suffix, Path(out_dir) / artifact.card.name)


def export_all(
    model: Model, card: ModelCard, out_dir: str | Path, representative: np.ndarray | None = None
) -> dict[str, Path]:
    """ONNX, float32 TFLite and (when representative rows are given) int8 TFLite with their cards.

    Keys: onnx, tflite, tflite_card, tflite_int8, tflite_int8_card.
    """
    paths: dict[str, Path] = {"onnx": write_artifact(export_onnx(model, card), out_dir)["model"]}
    float_paths = write_artifact(export_tflite(model, card), out_dir)
    paths["tflite"], paths["tflite_card"] = float_paths["model"], float_paths["card"]
    if representative is not None:
        int8_paths = write_artifact(export_tflite(model, card, representative, int8=True), out_dir)
        paths["tflite_int8"], paths["tflite_int8_card"] = int8_paths["model"], int8_paths["card"]
    return paths
