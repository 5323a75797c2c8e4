"""Accumulators: a running weighted sum for mean-based strategies, a spill file for robust statistics.

Memory is what lets a coordinator serve a thousand devices: `MeanAccumulator` holds one float64
vector whatever the number of updates; `SpillAccumulator` writes each update to disk and computes its
statistic over parameter ranges, so resident memory is one model plus one bounded chunk.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from coordinator.aggregation import math as agg_math
from coordinator.aggregation.base import UpdateAccumulator, Weighting, nonfinite_error
from coordinator.aggregation.errors import AggregationError


class MeanAccumulator(UpdateAccumulator):
    """Weighted mean of the updates from a float64 running sum: O(model) memory, one pass per update.

    Summing float32 deltas in float64 makes the result independent of arrival order to well below
    float32 resolution, so a round re-folded after a crash gives the same model within float32 rounding.
    """

    kind = "mean"

    def __init__(self, n_params: int, weighting: Weighting = "samples") -> None:
        super().__init__(n_params)
        self.weighting = weighting
        self._sum = np.zeros(self.n_params, dtype=np.float64)
        self._mean_weight = 0.0  # the weights the mean divides by (samples, or 1 per update)
        self._total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def add(self, delta: np.ndarray, weight: float) -> None:
        delta, weight = self._check_update(delta, weight)
        factor = weight if self.weighting == "samples" else 1.0
        n_bad = agg_math.fold_weighted(self._sum, delta, factor)
        if n_bad:
            raise nonfinite_error(n_bad)
        self._mean_weight += factor
        self._total_weight += weight
        self._count += 1

    def result(self) -> np.ndarray:
        self._check_open()
        if not self._count:
            raise AggregationError("FHAI-A006", "no update was accepted in this round: nothing to average")
        return agg_math.weighted_mean(self._sum, self._mean_weight)

    def close(self) -> None:
        self._sum = np.zeros(0)
        super().close()


# Reads a chunk of (n_updates, w) values, one row per update, and returns a float64 (w,) statistic.
ChunkStatistic = Callable[[np.ndarray], np.ndarray]

ROW_DTYPE = np.dtype(np.float32)


class SpillAccumulator(UpdateAccumulator):
    """Keeps every update in a spill file (one float32 row per update) for statistics that need them all.

    Rows are appended with plain writes and `result()` reads one chunk of parameters at a time with
    positioned reads (each update's slice of the chunk is contiguous in the file) into one reused
    buffer of `chunk_bytes`: file pages stay in the OS cache, never in this process, so resident
    memory is the buffer and its sorted copy whatever the number of updates. (Reading through
    np.memmap instead left 2.2 GB resident for 1,000 updates of 1M parameters, measured: the kernel
    maps much more than each row's touched slice.) Weights are recorded; these statistics are unweighted.
    """

    kind = "spill"

    def __init__(
        self,
        n_params: int,
        statistic: ChunkStatistic,
        spill_dir: str | Path | None = None,
        chunk_bytes: int = 32 * 2**20,
    ) -> None:
        super().__init__(n_params)
        self.statistic = statistic
        self.spill_dir = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())
        self.chunk_bytes = int(chunk_bytes)
        self._weights: list[float] = []
        self._path: Path | None = None
        self._file: BinaryIO | None = None
        self._cleanup: weakref.finalize | None = None

    @property
    def count(self) -> int:
        return len(self._weights)

    @property
    def total_weight(self) -> float:
        return float(sum(self._weights))

    @property
    def path(self) -> Path | None:
        """The spill file, once the first update arrived."""
        return self._path

    def add(self, delta: np.ndarray, weight: float) -> None:
        delta, weight = self._check_update(delta, weight)
        n_bad = int(np.count_nonzero(~np.isfinite(delta)))
        if n_bad:
            raise nonfinite_error(n_bad)
        spill = self._open_spill()
        try:
            spill.write(delta.data)
            spill.flush()
        except OSError as exc:
            # A partial row would shift every later one: cut the file back to whole rows.
            spill.seek(self.count * self._row_bytes)
            spill.truncate()
            raise AggregationError(
                "FHAI-A008", f"cannot write the update to the spill file {self._path} ({exc}): free disk space there"
            ) from exc
        self._weights.append(weight)

    def result(self) -> np.ndarray:
        self._check_open()
        k = self.count
        if not k:
            raise AggregationError("FHAI-A006", "no update was accepted in this round: nothing to aggregate")
        assert self._path is not None and self._file is not None
        self._file.flush()
        out = np.empty(self.n_params, dtype=np.float64)
        width = min(self.n_params, max(1, self.chunk_bytes // (k * ROW_DTYPE.itemsize)))
        chunk = np.empty((k, width), dtype=ROW_DTYPE)
        fd = os.open(self._path, os.O_RDONLY)
        try:
            for lo in range(0, self.n_params, width):
                hi = min(lo + width, self.n_params)
                for i in range(k):
                    offset = i * self._row_bytes + lo * ROW_DTYPE.itemsize
                    _read_exact(fd, chunk[i, : hi - lo].data.cast("B"), offset, self._path)
                out[lo:hi] = self.statistic(chunk[:, : hi - lo])
        finally:
            os.close(fd)
        return out

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()
        self._file = None
        self._path = None
        super().close()

    @property
    def _row_bytes(self) -> int:
        return self.n_params * ROW_DTYPE.itemsize

    def _open_spill(self) -> BinaryIO:
        if self._file is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="round-updates-", suffix=".f32", dir=self.spill_dir)
            self._adopt(Path(name), open(fd, "wb"))  # noqa: SIM115 - lives as long as the accumulator
        assert self._file is not None
        return self._file

    def _adopt(self, path: Path, spill: BinaryIO) -> None:
        self._path = path
        self._file = spill
        # Delete the spill file when the accumulator is closed or garbage-collected.
        self._cleanup = weakref.finalize(self, _remove_spill, spill, path)


def _remove_spill(spill: BinaryIO, path: Path) -> None:
    spill.close()
    path.unlink(missing_ok=True)


def _read_exact(fd: int, into: memoryview, offset: int, path: Path) -> None:
    """Fill `into` from the file at `offset` (pread may return less than asked)."""
    done = 0
    while done < into.nbytes:
        n = os.preadv(fd, [into[done:]], offset + done)
        if n <= 0:
            raise AggregationError(
                "FHAI-A008", f"spill file {path} ended early: it was truncated or removed while the round was open"
            )
        done += n
