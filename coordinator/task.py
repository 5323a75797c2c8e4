"""A federated task: what to learn (feature spec, label, model), how (strategy, training), and the
round rules (rounds, cohort, quorum, deadline). Loaded from YAML: a file, or a task name looked up in
the config folders and the package's firmware_configs/tasks/ (edge_runtime/configs.py)."""

from __future__ import annotations

import os
from importlib.resources.abc import Traversable
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coordinator.aggregation import build_strategy
from coordinator.downlink import DownlinkSettings
from coordinator.errors import CoordinatorError
from coordinator.retention import Retention
from edge_runtime import configs
from edge_runtime.messages import CodecSettings
from edge_runtime.model import ModelSpec
from edge_runtime.trainer import TrainConfig
from edge_runtime.wire import check_device_id
from fhir_adapters.featurespec import FeatureSpec, parse_spec


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: list[int] = Field(default_factory=list)
    n_classes: int = Field(2, ge=2)


class ExportSection(BaseModel):
    """Which on-device formats the coordinator exports, and when: an export is published (retained) only when
    it changes what a device does, not after every round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    formats: list[Literal["onnx", "tflite", "tflite_int8"]] = Field(default_factory=list)
    every: int = Field(0, ge=0)  # also every this many rounds (0: no periodic exports)
    on_improvement: bool = True  # the model whose pooled held-out AUROC beats every earlier model's
    at_end: bool = True  # the last round's model


class TaskDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    description: str = ""
    feature_spec: dict[str, Any]
    model: ModelSection = Field(default_factory=ModelSection)
    strategy: dict[str, Any] = Field(default_factory=lambda: {"name": "fedavg"})
    rounds: int = Field(10, ge=1, le=10_000)
    cohort_size: int = Field(5, ge=1)
    min_updates: int = Field(2, ge=1)
    round_deadline_s: float = Field(120.0, gt=0)
    # A round opens once cohort_size devices are online, or after this wait with at least min_updates.
    cohort_wait_s: float = Field(30.0, ge=0)
    # A round that misses its quorum by the deadline is re-announced this many times before the task fails.
    deadline_extensions: int = Field(2, ge=0)
    train: dict[str, Any] = Field(default_factory=dict)
    codec: CodecSettings = Field(default_factory=CodecSettings)
    downlink: DownlinkSettings = Field(default_factory=DownlinkSettings)
    export: ExportSection = Field(default_factory=ExportSection)
    retention: Retention = Field(default_factory=Retention)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TaskDefinition:
        check_device_id(self.task)  # task ids are topic levels too
        if self.min_updates > self.cohort_size:
            raise ValueError(f"min_updates ({self.min_updates}) cannot exceed cohort_size ({self.cohort_size})")
        TrainConfig(**self.train)  # fail at load time, not in every device
        build_strategy(self.strategy)
        self.spec()
        return self

    def spec(self) -> FeatureSpec:
        return parse_spec(self.feature_spec)

    def model_spec(self, n_features: int) -> ModelSpec:
        return ModelSpec(n_features, tuple(self.model.hidden), self.model.n_classes)


def parse_task(data: object, source: str = "task") -> TaskDefinition:
    try:
        return TaskDefinition.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise CoordinatorError("FHAI-J001", f"{source}: invalid task definition at {where!r}: {first['msg']}") from exc


def load_task(source: str | os.PathLike[str] | Traversable) -> TaskDefinition:
    """A task from a YAML file, a packaged resource, or a task name (see edge_runtime/configs.py)."""
    path = source if isinstance(source, Traversable) else configs.resolve("tasks", source, ".yaml").file
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CoordinatorError("FHAI-J002", f"cannot read task file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CoordinatorError("FHAI-J003", f"{path} is not valid YAML: {exc}") from exc
    return parse_task(data, str(path))
