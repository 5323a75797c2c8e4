"""One coordinator per task: an exclusive lease on the task in its store, bound to one coordinator key.

The lease is a lock whose owner is a live process, not a row with heartbeats: on PostgreSQL a session
advisory lock held by one dedicated connection, on SQLite `flock` on a lock file next to the database.
The server or the kernel drops such a lock the moment its holder dies (SIGKILL included), so a crashed
coordinator can restart at once, with no expiry to wait out and no clocks to trust, while a live holder
cannot lose it to a slow heartbeat. Who holds it (host, pid, work dir) is written beside it so that a
refused coordinator can say whom to stop.

The store also remembers the fingerprint of the key the task was first run with: devices trust only that
key, so a coordinator started with another work dir (and thus a fresh key) is refused before it announces
anything they would reject.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, func, select
from sqlalchemy.exc import OperationalError

from coordinator.errors import CoordinatorError
from coordinator.store import Store
from edge_runtime.keys import public_hex

log = logging.getLogger("fhai.coordinator")


def key_fingerprint(key: Ed25519PrivateKey) -> str:
    """A short, stable name of the coordinator's public key: SHA-256 of its hex form, first 16 hex digits."""
    return "SHA256:" + hashlib.sha256(public_hex(key).encode()).hexdigest()[:16]


def advisory_key(task_id: str) -> int:
    """The task's PostgreSQL advisory lock number (a signed 64-bit integer)."""
    return int.from_bytes(hashlib.sha256(f"fhai-task-lease/{task_id}".encode()).digest()[:8], "big", signed=True)


def _holder(work_dir: Path) -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "work_dir": str(work_dir.resolve()), "since": time.time()}


def _describe(holder: dict[str, object] | None) -> str:
    if not holder:
        return "another coordinator"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))  # type: ignore[arg-type]
    return f"the coordinator with pid {holder.get('pid')} on {holder.get('host')} (work dir {holder.get('work_dir')}, since {since})"


class TaskLease:
    """Held while a coordinator (or `recover`) works on a task; `release()` or leaving the `with` frees it."""

    def __init__(self, store: Store, task_id: str, work_dir: Path) -> None:
        self.store = store
        self.task_id = task_id
        self.work_dir = work_dir
        self.holder = _holder(work_dir)
        self._file: IO[str] | None = None
        self._conn: Connection | None = None

    @property
    def lock_file(self) -> Path | None:
        """SQLite: the lock file next to the database (None for an in-memory database)."""
        database = self.store.engine.url.database
        if self.store.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return None
        return Path(database).with_name(f"{Path(database).name}.{self.task_id}.lock")

    def acquire(self) -> Self:
        if self.store.engine.dialect.name == "postgresql":
            self._acquire_advisory()
        elif self.lock_file is not None:
            self._acquire_file(self.lock_file)
        self.store.set_lease_holder(self.task_id, json.dumps(self.holder))
        return self

    def _acquire_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held open for the lease's lifetime: the open file is the lock
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read()
            fh.close()
            raise self._held(json.loads(text) if text.strip().startswith("{") else None) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(self.holder))
        fh.flush()
        self._file = fh

    def _acquire_advisory(self) -> None:
        conn = self.store.engine.connect()
        try:
            got = conn.execute(select(func.pg_try_advisory_lock(advisory_key(self.task_id)))).scalar()
            conn.commit()  # end the implicit transaction; the session-level lock stays with the connection
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            raise self._held(self.store.lease_holder(self.task_id))
        self._conn = conn

    def _held(self, holder: dict[str, object] | None) -> CoordinatorError:
        return CoordinatorError(
            "FHAI-S701",
            f"task {self.task_id} is already run by {_describe(holder)}: a task has one coordinator. "
            "Stop that one first (or wait for it to end), or run this one with another task id",
        )

    def check(self) -> None:
        """Make sure the lease is still ours (PostgreSQL: its connection survived); re-take it after an outage.

        Raises FHAI-S703 if another coordinator took the task meanwhile: this one must stop at once.
        """
        if self._conn is None:
            return
        try:
            self._conn.execute(select(1)).scalar()
            self._conn.commit()
            return
        except OperationalError:
            log.warning("the connection holding task %s's lease broke; taking the lease again", self.task_id)
            self._conn.invalidate()
            self._conn.close()
            self._conn = None
        try:
            self._acquire_advisory()
        except CoordinatorError as exc:
            raise CoordinatorError(
                "FHAI-S703",
                f"lost task {self.task_id}'s lease during a store outage and another coordinator took it: "
                f"this one stops ({exc.message})",
            ) from exc

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(select(func.pg_advisory_unlock(advisory_key(self.task_id))))
                self._conn.commit()
            except OperationalError:
                pass  # the server is gone, and the lock with its session
            self._conn.close()
            self._conn = None
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def claim_task(store: Store, task_id: str, key: Ed25519PrivateKey, work_dir: Path) -> TaskLease:
    """Take the task's lease and check `key` is the one the task runs with (recording it on first use)."""
    lease = TaskLease(store, task_id, work_dir).acquire()
    try:
        bound = store.bind_coordinator_key(task_id, key_fingerprint(key), str(work_dir.resolve()))
        if bound is not None:
            fingerprint, first_dir = bound
            raise CoordinatorError(
                "FHAI-S702",
                f"task {task_id} runs with coordinator key {fingerprint} (work dir {first_dir}), but "
                f"{work_dir / 'coordinator.key'} is {key_fingerprint(key)}: devices trust only the first. "
                f"Start with --work-dir {first_dir}, or use a new task id",
            )
    except BaseException:
        lease.release()
        raise
    return lease
