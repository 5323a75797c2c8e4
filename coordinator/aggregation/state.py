"""Saved state as bytes: a dict of numpy arrays in the .npz format, read back with pickling refused.

Used for strategy state (server optimizer moments). Scalars and strings
are stored as 0-d arrays, so a reader needs numpy only, and a crafted file cannot run code.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from coordinator.aggregation.errors import AggregationError

StateDict = dict[str, np.ndarray]
T = TypeVar("T")


def encode_state(state: Mapping[str, np.ndarray | float | int | str]) -> bytes:
    """Serialize a flat dict of arrays and scalars to .npz bytes (no pickle)."""
    arrays = {}
    for key, value in state.items():
        array = np.asarray(value)
        if array.dtype == object:
            raise AggregationError("FHAI-A007", f"state entry {key!r} is not numeric or text and cannot be saved")
        arrays[key] = array
    # The .npz layout np.savez writes, built here so any key is allowed (savez reserves "file").
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def decode_state(blob: bytes) -> StateDict:
    """Read .npz bytes written by `encode_state`; refuses pickled content and unreadable data."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise AggregationError(
            "FHAI-A007", f"saved aggregation state is unreadable ({exc}): restore it from the store's backup"
        ) from exc


def scalar(state: Mapping[str, np.ndarray], key: str, kind: Callable[[Any], T]) -> T:
    """A scalar entry of a decoded state as `kind` (int, float, str), or AggregationError naming the key."""
    if key not in state or np.asarray(state[key]).ndim != 0:
        raise AggregationError(
            "FHAI-A007", f"saved aggregation state has no scalar {key!r}: it was not written by this strategy"
        )
    return kind(np.asarray(state[key]).item())
