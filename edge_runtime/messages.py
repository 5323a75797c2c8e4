"""The headers of protocol v1's frames as schemas, and the model body layout.

Both sides validate headers with these models, so a field missing or of the wrong type is one clear
error instead of a KeyError deep in a handler.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_runtime.model import Model, ModelSpec, Standardizer
from edge_runtime.rebuild import Hole
from edge_runtime.wire import Frame, WireError

H = TypeVar("H", bound="_Header")
Phase = Literal["stats", "train", "eval"]


class _Header(BaseModel):
    # Frames carry extra envelope fields (kind, sender, ts, nonce, body_len): ignore them here.
    model_config = ConfigDict(extra="ignore", frozen=True)

    task: str
    round: int = Field(ge=0)


class CodecSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[4, 8, 32] = 8
    block_size: int = Field(256, ge=8, le=65_536)
    compress: bool = True  # zstd: 8-bit bodies to ~0.23 of float32 (docs/benchmarks/codec.md)


class Announcement(_Header):
    """What round `round` of `task` asks of the selected devices."""

    phase: Phase
    model_version: str
    deadline: float
    cohort: list[str]
    train: dict[str, Any] = Field(default_factory=dict)  # the task's defaults; a device profile may override
    train_required: dict[str, Any] = Field(default_factory=dict)  # the strategy's settings (FedProx mu): always win
    codec: CodecSettings = Field(default_factory=CodecSettings)
    feature_spec: dict[str, Any]
    feature_spec_hash: str
    max_update_bytes: int = Field(gt=0)
    final: bool = False


class ModelHeader(_Header):
    model_version: str
    spec: dict[str, Any]


class UpdateHeader(_Header):
    model_version: str
    n_samples: int = Field(gt=0)
    train_loss: float


class StatsHeader(_Header):
    n: int = Field(gt=0)
    n_features: int = Field(gt=0)
    columns: list[str]  # the feature table's column names and units, identical at every site
    units: list[str | None]


class ArtifactHeader(_Header):
    """An exported model (ONNX / TFLite) for on-device inference; `card` is edge_runtime.inference.ModelCard."""

    model_version: str
    format: Literal["onnx", "tflite", "tflite_int8"]
    card: dict[str, Any]  # `rounds` says which round's model the artifact is
    # "full": the body is the artifact; "rebuild": the body is its zstd skeleton, the device fills `holes`
    # from the parameters of `model_version` it holds (edge_runtime.rebuild)
    delivery: Literal["full", "rebuild"] = "full"
    holes: list[Hole] = Field(default_factory=list, max_length=4096)
    reason: str = ""  # the export policy's trigger: improved, every, end


class EvalHeader(_Header):
    model_version: str
    metrics: dict[str, float]
    pos_hist: list[int]
    neg_hist: list[int]


def parse_header(frame: Frame, schema: type[H]) -> H:
    try:
        return schema.model_validate(frame.header)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WireError("FHAI-W020", f"{frame.kind} header field {where!r}: {first['msg']}") from exc


def model_body(model: Model) -> bytes:
    """params | standardizer mean | standardizer scale, float32 little-endian."""
    return b"".join(
        np.ascontiguousarray(a, "<f4").tobytes()
        for a in (model.params, model.standardizer.mean, model.standardizer.scale)
    )


def model_from_body(spec_dict: dict[str, Any], body: bytes) -> Model:
    """The inverse of `model_body`, checking sizes and finiteness (a frame's or a checkpoint's bytes)."""
    spec = ModelSpec.from_dict(spec_dict)
    n_params, d = spec.layout().size, spec.n_features
    if len(body) != 4 * (n_params + 2 * d):
        raise WireError("FHAI-W021", f"model body has {len(body)} bytes, {spec} needs {4 * (n_params + 2 * d)}")
    flat = np.frombuffer(body, "<f4").astype(np.float32)
    if not np.isfinite(flat).all():
        raise WireError("FHAI-W022", "model body holds non-finite values")
    return Model(
        spec, flat[:n_params].copy(), Standardizer(flat[n_params : n_params + d].copy(), flat[n_params + d :].copy())
    )


def stats_body(total: np.ndarray, total_sq: np.ndarray) -> bytes:
    return np.ascontiguousarray(total, "<f8").tobytes() + np.ascontiguousarray(total_sq, "<f8").tobytes()


def stats_from_body(body: bytes, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    if len(body) != 16 * n_features:
        raise WireError("FHAI-W024", f"stats body has {len(body)} bytes, expected {16 * n_features}")
    arr = np.frombuffer(body, "<f8")
    if not np.isfinite(arr).all():
        raise WireError("FHAI-W025", "stats body holds non-finite values")
    return arr[:n_features].copy(), arr[n_features:].copy()
