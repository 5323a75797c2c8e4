"""Device profiles (devices/*.yaml, shipped in firmware_configs or overridden in a config folder, see
edge_runtime/configs.py): how hard a device may work in a round."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_runtime import configs
from edge_runtime.errors import ConfigError
from edge_runtime.trainer import TrainConfig


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    description: str = ""
    # Training settings the device insists on; they override the round announcement's defaults.
    train: dict[str, Any] = Field(default_factory=dict)
    quantization_bits: Literal[4, 8, 32] | None = None  # None: what the round announcement asks
    memory_budget_mb: float = Field(256.0, gt=0)
    holdout_fraction: float = Field(0.2, ge=0.05, le=0.5)
    inference_backend: Literal["litert", "onnxruntime"] = "litert"
    inference_precision: Literal["float", "int8"] = "float"  # int8: LiteRT full-integer model

    @field_validator("train")
    @classmethod
    def _train_is_a_train_config(cls, v: dict[str, Any]) -> dict[str, Any]:
        TrainConfig(**v)  # unknown keys and bad values fail when the profile loads, not mid-round
        return v


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by file path, or by name from the config folders or the package (configs.py's order)."""
    found = configs.resolve("devices", name_or_path, ".yaml")
    path = found.origin
    try:
        data = yaml.safe_load(found.read_text())
    except OSError as exc:
        known = ", ".join(configs.available("devices", ".yaml"))
        raise ConfigError(
            "FHAI-P001", f"cannot read device profile {path} ({exc.strerror}); known profiles: {known}"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError("FHAI-P002", f"device profile {path} is not valid YAML: {exc}") from exc
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError("FHAI-P003", f"device profile {path}: {where}: {first['msg']}") from exc


def training_bytes(n_rows: int, n_features: int, n_params: int, epochs: int, batch_size: int, widest: int) -> int:
    """What one local training run holds: the standardized copy of X, the epoch orders, and the
    parameters with their gradient and optimizer moments, plus the batch activation buffers."""
    return n_rows * n_features * 4 * 2 + epochs * n_rows * 8 + n_params * 4 * 6 + batch_size * widest * 4 * 8
