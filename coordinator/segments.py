"""Update bodies of a SQLite store in append-only segment files, one per (task, round), next to the database.

Why not in the database: at 1M parameters a body is ~1 MB, and SQLite writes each twice (WAL, then the
database), rewrites its pages again to drop it, and must vacuum to give the space back; measured, that was
most of the coordinator's time per update. A segment file is written once (appended), synced once per group
commit before the rows that point into it are committed, read back only to re-fold an open round after a
restart, and deleted whole when its round's bodies are dropped. The database keeps each body's offset,
length and SHA-256, so a body read back is checked before it is folded. Bytes appended but never committed
(a crash between the sync and the commit) are simply never pointed at.

A PostgreSQL store keeps bodies in the database: it is chosen to survive the loss of the coordinator's host,
and the open round's bodies must survive with it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import BinaryIO

from coordinator.errors import CoordinatorError


class SegmentFiles:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: dict[tuple[str, int], BinaryIO] = {}
        self._dirty: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def path(self, task_id: str, round_no: int) -> Path:
        return self.folder / task_id / f"round-{round_no}.seg"

    def append(self, task_id: str, round_no: int, body: bytes) -> int:
        """Append a body; returns its offset. Durable only after `sync()`."""
        key = (task_id, round_no)
        with self._lock:
            fh = self._open.get(key)
            if fh is None:
                path = self.path(task_id, round_no)
                path.parent.mkdir(parents=True, exist_ok=True)
                fh = self._open[key] = open(path, "ab")  # noqa: SIM115 - kept open while the round collects
            offset = fh.tell()
            fh.write(body)
            self._dirty.add(key)
            return offset

    def sync(self) -> None:
        """Flush and fsync every segment appended to since the last sync."""
        with self._lock:
            for key in self._dirty:
                fh = self._open[key]
                fh.flush()
                os.fsync(fh.fileno())
            self._dirty.clear()

    def read(self, task_id: str, round_no: int, offset: int, length: int, sha256: str | None) -> bytes:
        path = self.path(task_id, round_no)
        self.sync()
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                body = fh.read(length)
        except OSError as exc:
            raise CoordinatorError(
                "FHAI-S715", f"cannot read the update bodies in {path} ({exc.strerror}): restore the file from backup"
            ) from exc
        if len(body) != length or (sha256 is not None and hashlib.sha256(body).hexdigest() != sha256):
            raise CoordinatorError(
                "FHAI-S715",
                f"an update body in {path} at offset {offset} is truncated or altered: restore the file from backup",
            )
        return body

    def drop(self, task_id: str, round_no: int) -> int:
        """Delete a round's segment; returns the bytes given back."""
        with self._lock:
            fh = self._open.pop((task_id, round_no), None)
            self._dirty.discard((task_id, round_no))
            if fh is not None:
                fh.close()
        path = self.path(task_id, round_no)
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        return size

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.rglob("*.seg")) if self.folder.exists() else 0
