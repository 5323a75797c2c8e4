"""A float export rebuilt on the device from the parameters it already holds: no TensorFlow, no onnx package.

A float artifact (ONNX, TFLite) of our fixed graph is structure plus weights, and the weights are the model's
folded layers stored as plain little-endian float32 runs (ONNX initializers' raw_data, TFLite buffers). The
coordinator sends the artifact with those runs zeroed, zstd-compressed (a few hundred bytes whatever the
model's size), and a list of holes: where each run starts, which array fills it, and whether it is stored
transposed (TFLite's FullyConnected keeps weights as [out, in]). The device writes the arrays of the model it
holds into the holes and checks the sha256 of the result against the model card: a match means it holds
exactly the bytes a fresh export would have. Bytes that are not holes (graph, metadata, any constant an
exporter adds) travel in the skeleton, so the scheme does not depend on a format's layout or on names
beyond `export_arrays`, the one mapping from a model to its exported arrays that the exporters use too.
"""

from __future__ import annotations

import hashlib

import numpy as np
import zstandard
from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.errors import EdgeError
from edge_runtime.model import Model

Layers = list[tuple[np.ndarray, np.ndarray]]
MAX_ARTIFACT_BYTES = 256 << 20


class RebuildError(EdgeError):
    """A skeleton and holes that do not rebuild the announced artifact from the parameters held here."""


class Hole(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    offset: int = Field(ge=0)
    name: str
    transposed: bool = False


def folded_layers(model: Model, fold_standardization: bool = True) -> Layers:
    """The network as (W, b) float32 pairs for raw inputs, ready for MatMul + Add.

    (x - m) / s @ W0 + b0 == x @ (W0 / s[:, None]) + (b0 - (m / s) @ W0), in float64 so folding adds no error
    beyond the final float32 rounding. The dot product is an explicit row-by-row sum rather than BLAS, whose
    summation order varies between machines: a device rebuilding the export must get the coordinator's bits.
    The binary output layer is mirrored to [-W, W], [-b, b].
    """
    views = model.views()
    n_layers = model.spec.layout().n_layers
    layers = [(views[f"W{i}"].astype(np.float64), views[f"b{i}"].astype(np.float64)) for i in range(n_layers)]
    if fold_standardization:
        mean = model.standardizer.mean.astype(np.float64)
        scale = model.standardizer.scale.astype(np.float64)
        W0, b0 = layers[0]
        layers[0] = (W0 / scale[:, None], b0 - ((mean / scale)[:, None] * W0).sum(axis=0))
    if model.spec.n_outputs == 1:
        W, b = layers[-1]
        layers[-1] = (np.concatenate([-W, W], axis=1), np.concatenate([-b, b]))
    return [(W.astype(np.float32), b.astype(np.float32)) for W, b in layers]


def export_arrays(model: Model) -> dict[str, np.ndarray]:
    """The float export's weight arrays by initializer name (W0, b0, W1, ...), as the exporters write them."""
    out: dict[str, np.ndarray] = {}
    for i, (W, b) in enumerate(folded_layers(model)):
        out[f"W{i}"], out[f"b{i}"] = W, b
    return out


def _run(array: np.ndarray, transposed: bool) -> bytes:
    return np.ascontiguousarray(array.T if transposed else array, "<f4").tobytes()


def fill_holes(skeleton: bytes, holes: list[Hole], arrays: dict[str, np.ndarray]) -> bytes:
    """The skeleton with every hole filled from `arrays`; holes must be zeroed, in bounds and disjoint."""
    out = bytearray(skeleton)
    end = -1
    for hole in sorted(holes, key=lambda h: h.offset):
        if hole.name not in arrays:
            raise RebuildError("FHAI-L811", f"hole {hole.name!r} names no array of this model")
        run = _run(arrays[hole.name], hole.transposed)
        stop = hole.offset + len(run)
        if hole.offset < end or stop > len(out):
            raise RebuildError("FHAI-L811", f"hole {hole.name!r} at {hole.offset} overlaps another or the end")
        if any(out[hole.offset : stop]):
            raise RebuildError("FHAI-L811", f"hole {hole.name!r} at {hole.offset} is not zeroed in the skeleton")
        out[hole.offset : stop] = run
        end = stop
    return bytes(out)


def rebuild_artifact(
    packed_skeleton: bytes, holes: list[Hole], model: Model, sha256: str, max_bytes: int = MAX_ARTIFACT_BYTES
) -> bytes:
    """The artifact the coordinator exported, from its zstd skeleton and the parameters of `model`.

    Raises RebuildError when the result is not byte for byte the export the card's sha256 names.
    """
    try:
        declared = zstandard.get_frame_parameters(packed_skeleton).content_size
        if not 0 < declared <= max_bytes:
            raise RebuildError("FHAI-L812", f"skeleton declares {declared} bytes, outside (0, {max_bytes}]")
        skeleton = zstandard.ZstdDecompressor().decompress(packed_skeleton, max_output_size=declared)
    except zstandard.ZstdError as exc:
        raise RebuildError("FHAI-L812", f"artifact skeleton is not a zstd frame: {exc}") from exc
    data = fill_holes(skeleton, holes, export_arrays(model))
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RebuildError(
            "FHAI-L813",
            f"the artifact rebuilt from model {model.version()} does not match the card's sha256: "
            "fetching the whole artifact instead",
        )
    return data


def pack_skeleton(artifact: bytes, holes: list[Hole], arrays: dict[str, np.ndarray]) -> bytes:
    """The artifact with its holes zeroed, zstd-compressed (the coordinator's half of `rebuild_artifact`)."""
    out = bytearray(artifact)
    for hole in holes:
        n = len(_run(arrays[hole.name], hole.transposed))
        out[hole.offset : hole.offset + n] = bytes(n)
    return zstandard.ZstdCompressor(level=9, write_content_size=True).compress(bytes(out))
