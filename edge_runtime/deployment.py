"""The models a device runs for inference: received from the coordinator, checked, kept on disk, swapped live.

Layout under the device's state dir: models/<task>/<model_version><suffix> (+ .card.json for TFLite),
models/<task>/current.json naming the one in use, and models/<task>/feature_spec.json, the spec the
task's rows are built with (what `fhai-edge predict` needs to score patients).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from edge_runtime.errors import EdgeError
from edge_runtime.inference import (
    ARTIFACT_SUFFIX,
    ModelCard,
    Predictor,
    card_path,
    check_compatible,
    load_predictor,
    save_model_files,
)
from edge_runtime.profile import DeviceProfile

log = logging.getLogger("fhai.edge.deploy")
KEEP_MODELS = 3


def artifact_format(profile: DeviceProfile) -> str:
    """Which export this device runs: ONNX on onnxruntime, TFLite (float or int8) on LiteRT."""
    if profile.inference_backend == "onnxruntime":
        return "onnx"
    return "tflite_int8" if profile.inference_precision == "int8" else "tflite"


class Deployment:
    """One task's inference model on this device; `install` swaps it without a restart."""

    def __init__(self, state_dir: Path, task: str, profile: DeviceProfile) -> None:
        self.folder = state_dir / "models" / task
        self.profile = profile
        self.format = artifact_format(profile)
        self._lock = threading.Lock()
        self._predictor: Predictor | None = None

    @property
    def predictor(self) -> Predictor | None:
        with self._lock:
            return self._predictor

    def save_feature_spec(self, spec: dict[str, Any], spec_hash: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "feature_spec.json").write_text(json.dumps({"hash": spec_hash, "spec": spec}))

    def feature_spec(self) -> dict[str, Any]:
        path = self.folder / "feature_spec.json"
        if not path.exists():
            raise EdgeError(
                "FHAI-E001", f"no feature spec in {self.folder}: join the task once (`fhai-edge run`) first"
            )
        data: dict[str, Any] = json.loads(path.read_text())["spec"]
        return data

    def install(self, data: bytes, card: ModelCard, spec_hash: str | None, columns: list[str] | None) -> Path:
        """Check the model fits this device's features, write it, load it, and make it the current one."""
        if spec_hash is not None and columns is not None:
            check_compatible(card, spec_hash, columns)
        files = save_model_files(data, card, ARTIFACT_SUFFIX[self.format], self.folder / card.model_version)
        predictor = load_predictor(files["model"])
        tmp = self.folder / "current.json.tmp"
        tmp.write_text(
            json.dumps({"path": files["model"].name, "model_version": card.model_version, "format": self.format})
        )
        tmp.replace(self.folder / "current.json")
        with self._lock:
            self._predictor = predictor
        self._prune(keep=KEEP_MODELS)
        log.info("inference model %s (%s, %s) installed", card.model_version, self.format, predictor.backend)
        return files["model"]

    def _prune(self, keep: int) -> None:
        """Keep the newest `keep` installed models (the current one among them); delete older files."""
        suffix = ARTIFACT_SUFFIX[self.format]
        models = sorted(self.folder.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime, reverse=True)
        current = self.current_path()
        for old in [m for m in models if m != current][max(0, keep - 1) :]:
            old.unlink(missing_ok=True)
            card_path(old).unlink(missing_ok=True)

    def current_path(self) -> Path:
        pointer = self.folder / "current.json"
        if not pointer.exists():
            raise EdgeError(
                "FHAI-E002",
                f"no inference model in {self.folder} yet: the coordinator publishes one after a round when the "
                "task's export.formats includes this device's format",
            )
        return self.folder / json.loads(pointer.read_text())["path"]

    def load_current(self) -> Predictor:
        return load_predictor(self.current_path())
