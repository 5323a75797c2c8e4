"""On-device inference from an exported model: model cards, compatibility checks, LiteRT and ONNX Runtime.

An exported model comes with a card: which feature spec (hash, columns, units) it scores, its version,
the rounds that trained it, its metrics and, for int8 TFLite, how to quantize inputs. A `.tflite` file's card
sits beside it (`<name>.card.json`, with the file's sha256); an `.onnx` file carries the same fields in its
`metadata_props`. Float artifacts take raw features (standardization is folded into the first layer).
Full-integer int8 artifacts cannot: one per-tensor input scale over raw columns as far apart as a count and
a lab value in mg/dL would zero out the small ones. So the int8 graph takes standardized features and its
card carries the per-feature mean and std; the predictor applies them before quantizing, so the caller
still passes raw features.

This module must not import tensorflow or coordinator (it runs on gateways with the lean dependency set);
the interpreters are imported when a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from edge_runtime.errors import EdgeError
from edge_runtime.model import ModelSpec

CARD_FORMAT_VERSION = 1
Backend = Literal["litert", "onnxruntime"]


class InferenceError(EdgeError):
    """A model file, card or feature matrix the predictor cannot use."""


class IncompatibleModelError(EdgeError):
    """A model built for another feature spec than the device's."""


@dataclass(frozen=True)
class InputQuantization:
    """How an int8 artifact's raw inputs become int8 and its int8 outputs become probabilities.

    q_j = clip(round((x_j - mean_j) / std_j / scale) + zero_point, -128, 127); p = (q_out - output_zero_point)
    * output_scale. `scale`/`zero_point` are the input tensor's, `mean`/`std` the model's standardization.
    """

    mean: list[float]
    std: list[float]
    scale: float
    zero_point: int
    output_scale: float
    output_zero_point: int
    dtype: str = "int8"

    @cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        # q = x * a + c with a = 1 / (std * scale), c = zero_point - mean * a: one multiply-add per value.
        a = 1.0 / (np.asarray(self.std, np.float64) * self.scale)
        c = self.zero_point - np.asarray(self.mean, np.float64) * a
        return a.astype(np.float32), c.astype(np.float32)

    def quantize(self, X: np.ndarray) -> np.ndarray:
        a, c = self._affine
        v = np.asarray(X, np.float32) * a
        v += c
        np.rint(v, out=v)
        np.clip(v, -128, 127, out=v)
        return v.astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.float64) - self.output_zero_point) * self.output_scale


@dataclass(frozen=True)
class ModelCard:
    """What a device needs to know about an exported model before it scores a patient with it."""

    name: str
    model_version: str
    spec: dict[str, Any]
    feature_spec_hash: str
    columns: list[str]
    units: list[str | None]
    rounds: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    artifact_format: str = ""  # "onnx" | "tflite", set by the exporter
    precision: str = "float32"  # "float32" | "int8"
    artifact_sha256: str = ""  # of the artifact bytes; empty inside an ONNX file (it cannot hash itself)
    input_quantization: InputQuantization | None = None
    format_version: int = CARD_FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.units) != len(self.columns):
            raise InferenceError(
                "FHAI-I003",
                f"model card has {len(self.columns)} columns but {len(self.units)} units: regenerate the card",
            )

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.spec)

    @property
    def n_classes(self) -> int:
        return self.model_spec.n_classes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        try:
            version = int(d.get("format_version", CARD_FORMAT_VERSION))
            if version > CARD_FORMAT_VERSION:
                raise InferenceError(
                    "FHAI-I004",
                    f"model card format {version} is newer than this runtime reads ({CARD_FORMAT_VERSION}): "
                    "upgrade the edge runtime",
                )
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(d) - known)
            if unknown:
                raise ValueError(f"unknown fields {unknown}")
            q = d.get("input_quantization")
            card = cls(
                **{
                    **d,
                    "spec": dict(d["spec"]),
                    "columns": [str(c) for c in d["columns"]],
                    "units": [None if u is None else str(u) for u in d["units"]],
                    "rounds": int(d.get("rounds", 0)),
                    "metrics": {str(k): float(v) for k, v in dict(d.get("metrics", {})).items()},
                    "input_quantization": None if q is None else InputQuantization(**q),
                    "format_version": version,
                }
            )
            ModelSpec.from_dict(card.spec)  # raises ModelError on a bad spec
        except (KeyError, TypeError, ValueError) as exc:
            raise InferenceError("FHAI-I003", f"malformed model card: {exc}; re-export the model") from exc
        return card

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InferenceError("FHAI-I003", f"model card is not valid JSON: {exc}; re-export the model") from exc
        if not isinstance(data, dict):
            raise InferenceError("FHAI-I003", "model card must be a JSON object; re-export the model")
        return cls.from_dict(data)

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props: strings stay plain (readable in any viewer), the rest is JSON."""
        out: dict[str, str] = {}
        for key, value in self.to_dict().items():
            if key == "artifact_sha256" or value is None:
                continue
            out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelCard:
        str_fields = {f.name for f in fields(cls) if f.type in ("str", str)}
        d: dict[str, Any] = {}
        try:
            for key, value in meta.items():
                if key not in {f.name for f in fields(cls)}:
                    continue  # other tools' metadata
                d[key] = value if key in str_fields else json.loads(value)
        except json.JSONDecodeError as exc:
            raise InferenceError("FHAI-I003", f"model metadata field is not valid JSON: {exc}") from exc
        return cls.from_dict(d)


def card_path(artifact: str | Path) -> Path:
    """`model.tflite` -> `model.card.json`; `model.int8.tflite` -> `model.int8.card.json`."""
    return Path(artifact).with_suffix(".card.json")


ARTIFACT_SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "tflite_int8": ".int8.tflite"}


def _write_atomic(path: Path, data: bytes) -> None:
    # A device loading the folder must never see half a model.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_model_files(data: bytes, card: ModelCard, suffix: str, stem: Path) -> dict[str, Path]:
    """Write `<stem><suffix>` and, for TFLite, its card beside it (ONNX carries its card inside)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_name(stem.name + suffix)
    _write_atomic(path, data)
    written = {"model": path}
    if card.artifact_format == "tflite":
        written["card"] = card_path(path)
        _write_atomic(written["card"], card.to_json().encode())
    return written


def check_compatible(card_or_meta: ModelCard | dict[str, str], spec_hash: str, columns: list[str]) -> None:
    """Refuse a model whose feature spec hash or columns differ from the device's: it would score garbage."""
    card = card_or_meta if isinstance(card_or_meta, ModelCard) else ModelCard.from_metadata(card_or_meta)
    if card.feature_spec_hash != spec_hash:
        raise IncompatibleModelError(
            "FHAI-I010",
            f"model {card.name!r} (version {card.model_version}) was trained for feature spec {card.feature_spec_hash}, "
            f"this device builds features with spec {spec_hash}: update the device's task definition or "
            "request the export of the model trained for this spec",
        )
    if list(card.columns) != list(columns):
        missing = [c for c in card.columns if c not in columns]
        extra = [c for c in columns if c not in card.columns]
        if missing or extra:
            detail = f"missing on the device: {missing}; not in the model: {extra}"
        else:
            first = next(i for i, (a, b) in enumerate(zip(card.columns, columns, strict=True)) if a != b)
            detail = f"same columns in another order (first difference at position {first}: model {card.columns[first]!r}, device {columns[first]!r})"
        raise IncompatibleModelError(
            "FHAI-I011",
            f"model {card.name!r} expects columns {card.columns} but the device's feature table differs ({detail}): "
            "rebuild the feature table with the model's feature spec",
        )


class Predictor(Protocol):
    card: ModelCard
    backend: str

    def predict_proba(self, X: np.ndarray) -> np.ndarray: ...


def _check_features(X: np.ndarray, card: ModelCard) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    n_features = len(card.columns)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise InferenceError(
            "FHAI-I006", f"features have shape {X.shape}, model {card.name!r} expects (n, {n_features})"
        )
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=0)).tolist()
        raise InferenceError(
            "FHAI-I007",
            f"features contain NaN or infinite values in columns {[card.columns[i] for i in bad]}: "
            "impute missing values with the feature spec's imputation first",
        )
    return np.ascontiguousarray(X)


class LiteRTPredictor:
    """A .tflite model on LiteRT; the input tensor is resized to each batch so 10k rows run as one call."""

    def __init__(self, content: bytes, card: ModelCard, num_threads: int | None = None) -> None:
        interpreter_cls, self.backend = _tflite_interpreter()
        self.card = card
        self._interpreter = interpreter_cls(model_content=content, num_threads=num_threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._batch = int(self._input["shape"][0])
        self._quant = self._check_quantization(card)

    def _check_quantization(self, card: ModelCard) -> InputQuantization | None:
        in_dtype = np.dtype(self._input["dtype"])
        if in_dtype == np.float32:
            return None
        q = card.input_quantization
        if in_dtype != np.int8 or q is None:
            raise InferenceError(
                "FHAI-I008",
                f"model input is {in_dtype} but its card has no int8 input quantization: re-export the model",
            )
        # The tensor details are the truth; a card that disagrees belongs to another conversion.
        in_scale, in_zp = self._input["quantization"]
        out_scale, out_zp = self._output["quantization"]
        if not (
            math.isclose(in_scale, q.scale, rel_tol=1e-6)
            and in_zp == q.zero_point
            and math.isclose(out_scale, q.output_scale, rel_tol=1e-6)
            and out_zp == q.output_zero_point
        ):
            raise InferenceError(
                "FHAI-I008",
                f"card quantization ({q.scale}, {q.zero_point}) does not match the model's input tensor "
                f"({in_scale}, {in_zp}): the card belongs to another export; re-export the model",
            )
        return q

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = _check_features(X, self.card)
        if len(X) == 0:
            return np.zeros((0, self.card.n_classes))
        if len(X) != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], [len(X), X.shape[1]])
            self._interpreter.allocate_tensors()
            self._batch = len(X)
        x = X if self._quant is None else self._quant.quantize(X)
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        out = self._interpreter.get_tensor(self._output["index"])
        return out.astype(np.float64) if self._quant is None else self._quant.dequantize(out)


class OnnxPredictor:
    """An .onnx model on ONNX Runtime (CPU)."""

    backend = "onnxruntime"

    def __init__(self, content: bytes, card: ModelCard | None = None, num_threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InferenceError(
                "FHAI-I005", "onnxruntime is not installed: install the edge extra (pip install 'fhai[edge]')"
            ) from exc
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        self.card = card or ModelCard.from_metadata(self._session.get_modelmeta().custom_metadata_map)
        self._input = self._session.get_inputs()[0].name

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = _check_features(X, self.card)
        if len(X) == 0:
            return np.zeros((0, self.card.n_classes))
        (out,) = self._session.run(None, {self._input: X})
        return np.asarray(out, np.float64)


def _tflite_interpreter() -> tuple[Any, str]:
    """LiteRT's Interpreter; the older tflite_runtime only where a device has nothing else (see DESIGN.md)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError as exc:
        raise InferenceError(
            "FHAI-I005", "no TFLite interpreter: install ai-edge-litert (pip install 'fhai[edge]')"
        ) from exc


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_predictor(path: str | Path, backend: Backend | None = None, num_threads: int | None = None) -> Predictor:
    """Load a `.tflite` (with its `.card.json` beside it) or `.onnx` model; the backend follows the suffix."""
    path = Path(path)
    backend = backend or ("onnxruntime" if path.suffix == ".onnx" else "litert" if path.suffix == ".tflite" else None)
    if backend is None:
        raise InferenceError("FHAI-I001", f"{path.name}: unknown model format; expected a .tflite or .onnx file")
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise InferenceError("FHAI-I001", f"cannot read model {path}: {exc.strerror}") from exc
    if backend == "onnxruntime":
        predictor: Predictor = OnnxPredictor(content, num_threads=num_threads)
        return predictor
    cpath = card_path(path)
    try:
        card = ModelCard.from_json(cpath.read_bytes())
    except OSError as exc:
        raise InferenceError(
            "FHAI-I002", f"model card {cpath} is missing: a .tflite model is shipped with its .card.json beside it"
        ) from exc
    if card.artifact_sha256 and card.artifact_sha256 != _sha256(content):
        raise InferenceError(
            "FHAI-I009",
            f"{path.name} does not match its card's sha256: the file is corrupt or the card belongs to "
            "another export; fetch both again",
        )
    return LiteRTPredictor(content, card, num_threads=num_threads)
