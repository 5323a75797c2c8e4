"""When to export the global model for inference, and how to ship a float export without its weights.

Exports happen when the task's policy says (`export.every`, `export.on_improvement`, `export.at_end`), not
after every round. A float export (ONNX, TFLite float) goes out as a skeleton with holes
(`edge_runtime.rebuild`) that devices fill from the parameters they already hold; the whole artifact is
retained beside it for a device that cannot (it does not hold that model, or its rebuild does not hash
right). int8 exports are calibrated anew each time and always travel whole.

Where the holes are is found with a probe: the same export of a model with random weights, in which every
weight array is a byte string found once. The plan is kept only if filling the real artifact's skeleton
with the real arrays gives back the artifact byte for byte, so a converter that lays out constants
differently from one model to the next (deduplicated buffers, folded constants) falls back to whole artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from coordinator.distribution import ArtifactFormat, build_artifacts
from coordinator.export import Artifact
from edge_runtime.model import Model, Standardizer
from edge_runtime.rebuild import Hole, export_arrays, fill_holes, pack_skeleton

REBUILDABLE = ("onnx", "tflite")  # float formats; int8 needs a new calibration, hence a new artifact


@dataclass(frozen=True)
class Skeleton:
    holes: list[Hole]
    packed: bytes  # zstd of the artifact with its holes zeroed


def probe_model(model: Model, seed: int = 0) -> Model:
    """A model of the same spec whose exported arrays are random, so each one's bytes occur once in an export."""
    rng = np.random.default_rng(seed)
    d = model.spec.n_features
    std = Standardizer(rng.normal(size=d).astype(np.float32), rng.uniform(0.5, 2.0, d).astype(np.float32))
    return Model(model.spec, rng.normal(size=model.params.size).astype(np.float32), std)


def plan_skeleton(model: Model, artifact: bytes, export: Callable[[Model], bytes]) -> Skeleton | None:
    """Holes and packed skeleton for `artifact` (the export of `model`), or None if it cannot be rebuilt."""
    probe_bytes = export(probe_model(model))
    if len(probe_bytes) != len(artifact):
        return None
    holes: list[Hole] = []
    for name, array in export_arrays(probe_model(model)).items():
        for transposed in (False, True) if array.ndim == 2 else (False,):
            run = np.ascontiguousarray(array.T if transposed else array, "<f4").tobytes()
            at = probe_bytes.find(run)
            if at >= 0 and probe_bytes.find(run, at + 1) < 0:
                holes.append(Hole(offset=at, name=name, transposed=transposed))
                break
    if not holes:
        return None
    arrays = export_arrays(model)
    packed = pack_skeleton(artifact, holes, arrays)
    skeleton = bytearray(artifact)
    for hole in holes:
        n = arrays[hole.name].nbytes
        skeleton[hole.offset : hole.offset + n] = bytes(n)
    try:
        if fill_holes(bytes(skeleton), holes, arrays) != artifact:
            return None
    except Exception:  # overlapping or misplaced holes: this format does not rebuild this way
        return None
    return Skeleton(holes, packed)


@dataclass(frozen=True)
class ArtifactOut:
    """One frame to sign and publish (retained): on the format's topic, or its `/full` topic when `full`."""

    fmt: str
    full: bool
    header: dict[str, Any]
    body: bytes
    artifact: Artifact


def artifact_frames(
    model: Model,
    formats: list[ArtifactFormat],
    *,
    task: str,
    round_no: int,
    reason: str,
    card_fields: dict[str, Any],
) -> list[ArtifactOut]:
    """The frames that ship `model` (the devices' copy, from round `round_no`) in each format.

    A rebuildable format yields the whole artifact for the `/full` topic first (so it is there before any
    device asks) and then the skeleton for the format's topic; anything else yields the whole artifact.
    """

    def export(m: Model, fmt: ArtifactFormat) -> Artifact:
        return build_artifacts(m, [fmt], rounds=round_no, **card_fields)[fmt]

    out: list[ArtifactOut] = []
    for fmt in formats:
        artifact = export(model, fmt)
        header = {
            "task": task,
            "round": round_no,
            "model_version": model.version(),
            "format": fmt,
            "card": artifact.card.to_dict(),
            "reason": reason,
        }
        skeleton = plan_skeleton(model, artifact.data, partial(_data, export, fmt)) if fmt in REBUILDABLE else None
        if skeleton is None:
            out.append(ArtifactOut(fmt, False, {**header, "delivery": "full"}, artifact.data, artifact))
            continue
        out.append(ArtifactOut(fmt, True, {**header, "delivery": "full"}, artifact.data, artifact))
        holes = [h.model_dump() for h in skeleton.holes]
        out.append(
            ArtifactOut(fmt, False, {**header, "delivery": "rebuild", "holes": holes}, skeleton.packed, artifact)
        )
    return out


def _data(export: Callable[[Model, ArtifactFormat], Artifact], fmt: ArtifactFormat, model: Model) -> bytes:
    return export(model, fmt).data


def improved(pooled_auroc: dict[int, float], round_no: int) -> bool:
    """Whether the model of `round_no` (>= 1) beats the pooled held-out AUROC of every earlier model."""
    if round_no < 1 or round_no not in pooled_auroc or not np.isfinite(pooled_auroc[round_no]):
        return False
    earlier = [v for r, v in pooled_auroc.items() if 1 <= r < round_no and np.isfinite(v)]
    return not earlier or pooled_auroc[round_no] > max(earlier)
