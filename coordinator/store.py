"""What the coordinator must not forget, in SQLite (default) or PostgreSQL through SQLAlchemy.

Accepted updates are stored with their encoded body before the broker is acknowledged, so a
coordinator killed at any moment re-folds exactly the updates it had accepted when it restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from coordinator.errors import CoordinatorError
from coordinator.segments import SegmentFiles
from coordinator.store_faults import retried
from coordinator.store_schema import (
    AcceptedUpdate,
    Base,
    Checkpoint,
    Device,
    EnrollmentToken,
    Evaluation,
    Rejection,
    Round,
    StoredUpdate,
    Task,
    TaskCoordinator,
    add_missing_columns,
)

DEFAULT_RETRY_S = 60.0


__all__ = [
    "AcceptedUpdate",
    "Base",
    "Checkpoint",
    "Device",
    "EnrollmentToken",
    "Evaluation",
    "Rejection",
    "Round",
    "Store",
    "StoredUpdate",
    "Task",
    "TaskCoordinator",
]


class Store:
    """A thin shell over the database: each method is one transaction."""

    def __init__(self, url: str, retry_s: float = DEFAULT_RETRY_S) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # pre_ping: after a PostgreSQL outage, pooled connections are dead; test each before use.
        self.engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        self.retry_s = retry_s  # how long a transient fault (PostgreSQL down) is retried before giving up
        self.retried_calls = 0
        self._group: list[dict[str, Any]] | None = None  # rows of the open group_commit()
        database = self.engine.url.database
        self.segments: SegmentFiles | None = None  # SQLite file stores keep update bodies in segment files
        if url.startswith("sqlite") and database and database != ":memory:" and not database.startswith("file:"):
            self.segments = SegmentFiles(Path(database + ".segments"))
        if url.startswith("sqlite"):
            # WAL so the status CLI can read while the coordinator writes; sync on commit so an
            # accepted update survives a SIGKILL.
            @event.listens_for(self.engine, "connect")
            def _pragmas(conn: Any, _record: Any) -> None:
                cur = conn.cursor()
                # Before the first table exists, so that pruned update bodies give their pages back to the disk.
                cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute(f"PRAGMA journal_size_limit={64 * 2**20}")  # the WAL shrinks back after a round
                cur.close()

        self._create_schema()
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @retried
    def _create_schema(self) -> None:
        Base.metadata.create_all(self.engine)
        add_missing_columns(self.engine, Base.metadata)

    # disk
    @retried
    def prune_update_bodies(self, task_id: str, up_to_round: int) -> tuple[int, int]:
        """Drop the bodies of committed rounds <= up_to_round (hash, size and metadata stay); (count, bytes)."""
        with self.session() as s, s.begin():
            committed = select(Round.round).where(
                Round.task_id == task_id, Round.status == "committed", Round.round <= up_to_round
            )
            where = (
                AcceptedUpdate.task_id == task_id,
                AcceptedUpdate.round.in_(committed),
                AcceptedUpdate.pruned_at.is_(None),
            )
            count, size = s.execute(
                select(func.count(), func.coalesce(func.sum(AcceptedUpdate.body_bytes), 0)).where(*where)
            ).one()
            rounds = set(s.scalars(select(AcceptedUpdate.round).where(*where).distinct()))
            s.execute(update(AcceptedUpdate).where(*where).values(body=b"", pruned_at=time.time()))
        if self.segments is not None:
            for round_no in rounds:  # after the commit: a crash before it leaves the bodies readable
                self.segments.drop(task_id, round_no)
        return int(count), int(size or 0)

    @retried
    def prune_checkpoints(self, task_id: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` checkpoints of the task; returns the rounds deleted."""
        with self.session() as s, s.begin():
            rounds = list(s.scalars(select(Checkpoint.round).where(Checkpoint.task_id == task_id)))
            doomed = sorted(rounds)[:-keep]
            if doomed:
                s.execute(delete(Checkpoint).where(Checkpoint.task_id == task_id, Checkpoint.round.in_(doomed)))
            return doomed

    def reclaim_space(self) -> None:
        """SQLite: give freed pages back to the file system (PostgreSQL's autovacuum reuses them by itself)."""
        if self.engine.dialect.name != "sqlite":
            return
        raw = self.engine.raw_connection()
        try:
            sqlite = raw.driver_connection
            assert sqlite is not None
            # executescript steps the pragma to completion (execute() stops after its first page).
            sqlite.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")
        finally:
            raw.close()

    @retried
    def size_bytes(self) -> int:
        """What the store takes on disk: the SQLite file, its WAL and segments, or the PostgreSQL database."""
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if not database or database == ":memory:":
                return 0
            files = [Path(database), Path(database + "-wal")]
            segments = self.segments.size_bytes() if self.segments is not None else 0
            return segments + sum(f.stat().st_size for f in files if f.exists())
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.pg_database_size(func.current_database()))).scalar_one())

    def session(self) -> Session:
        return self._session()

    # devices
    @retried
    def add_device(self, device_id: str, public_key: str, site: str = "") -> None:
        with self.session() as s, s.begin():
            existing = s.get(Device, device_id)
            if existing is not None and existing.public_key != public_key and existing.revoked_at is None:
                raise CoordinatorError(
                    "FHAI-S001", f"device {device_id} is already enrolled with another key: revoke it first"
                )
            if existing is None:
                s.add(Device(id=device_id, public_key=public_key, site=site))
            else:
                existing.public_key, existing.site, existing.revoked_at = public_key, site, None

    @retried
    def add_devices(self, devices: list[tuple[str, str]], site: str = "") -> int:
        """Enroll many (device id, public key) pairs in one transaction, by `add_device`'s rules; returns how many."""
        with self.session() as s, s.begin():
            existing = {d.id: d for d in s.scalars(select(Device).where(Device.id.in_([d for d, _ in devices])))}
            for device_id, public_key in devices:
                known = existing.get(device_id)
                if known is not None and known.public_key != public_key and known.revoked_at is None:
                    raise CoordinatorError(
                        "FHAI-S001", f"device {device_id} is already enrolled with another key: revoke it first"
                    )
                if known is None:
                    s.add(Device(id=device_id, public_key=public_key, site=site))
                else:
                    known.public_key, known.site, known.revoked_at = public_key, site, None
            return len(devices)

    @retried
    def revoke_device(self, device_id: str) -> bool:
        with self.session() as s, s.begin():
            dev = s.get(Device, device_id)
            if dev is None:
                return False
            dev.revoked_at = time.time()
            return True

    @retried
    def device_keys(self) -> dict[str, str]:
        """Public keys of devices that are enrolled and not revoked."""
        with self.session() as s:
            rows = s.execute(select(Device.id, Device.public_key).where(Device.revoked_at.is_(None)))
            return {r.id: r.public_key for r in rows}

    @retried
    def devices(self) -> list[Device]:
        with self.session() as s:
            return list(s.scalars(select(Device).order_by(Device.id)))

    # tasks and rounds
    @retried
    def get_task(self, task_id: str) -> Task | None:
        with self.session() as s:
            return s.get(Task, task_id)

    @retried
    def add_task(self, task_id: str, definition: str) -> None:
        try:
            with self.session() as s, s.begin():
                s.add(Task(id=task_id, definition=definition))
        except IntegrityError:
            if (existing := self.get_task(task_id)) is None or existing.definition != definition:
                raise

    @retried
    def set_task_status(self, task_id: str, status: str) -> None:
        with self.session() as s, s.begin():
            task = s.get(Task, task_id)
            if task is not None:
                task.status = status

    @retried
    def current_round(self, task_id: str) -> Round | None:
        with self.session() as s:
            return s.scalars(
                select(Round).where(Round.task_id == task_id).order_by(Round.round.desc()).limit(1)
            ).first()

    @retried
    def rounds(self, task_id: str) -> list[Round]:
        with self.session() as s:
            return list(s.scalars(select(Round).where(Round.task_id == task_id).order_by(Round.round)))

    @retried
    def open_round(self, r: Round) -> None:
        try:
            with self.session() as s, s.begin():
                s.add(r)
        except IntegrityError:
            # Our own row, if a retried COMMIT had landed the first time; anything else is a real clash.
            if (existing := self._round(r.task_id, r.round)) is None or existing.opened_at != r.opened_at:
                raise

    def _round(self, task_id: str, round_no: int) -> Round | None:
        with self.session() as s:
            return s.scalars(select(Round).where(Round.task_id == task_id, Round.round == round_no)).first()

    @retried
    def update_round(self, task_id: str, round_no: int, **fields: Any) -> None:
        with self.session() as s, s.begin():
            r = s.scalars(select(Round).where(Round.task_id == task_id, Round.round == round_no)).one()
            for k, v in fields.items():
                setattr(r, k, v)

    # the task's coordinator (coordinator/lease.py)
    @retried
    def set_lease_holder(self, task_id: str, holder: str) -> None:
        with self.session() as s, s.begin():
            row = s.get(TaskCoordinator, task_id)
            if row is None:
                s.add(TaskCoordinator(task_id=task_id, holder=holder))
            else:
                row.holder = holder

    @retried
    def lease_holder(self, task_id: str) -> dict[str, object] | None:
        with self.session() as s:
            row = s.get(TaskCoordinator, task_id)
            return json.loads(row.holder) if row is not None and row.holder else None

    @retried
    def bind_coordinator_key(self, task_id: str, fingerprint: str, work_dir: str) -> tuple[str, str] | None:
        """Record the task's coordinator key on first use; (fingerprint, work dir) on record if it differs."""
        with self.session() as s, s.begin():
            row = s.get(TaskCoordinator, task_id)
            if row is None:
                row = TaskCoordinator(task_id=task_id)
                s.add(row)
            if row.key_fingerprint is None:
                row.key_fingerprint, row.work_dir = fingerprint, work_dir
                return None
            return None if row.key_fingerprint == fingerprint else (row.key_fingerprint, row.work_dir)

    @retried
    def reopen_task(self, task_id: str, deadline: float) -> list[int]:
        """Set a failed or stuck task running again from its last checkpoint, in one transaction.

        A round whose checkpoint exists is committed (the checkpoint is its commit); every later round is
        collecting again until `deadline`, with the updates it had accepted. Returns the reopened rounds.
        """
        with self.session() as s, s.begin():
            task = s.get(Task, task_id)
            if task is None:
                raise CoordinatorError("FHAI-S705", f"no task {task_id!r} in this store: check --store")
            if task.status == "done":
                raise CoordinatorError("FHAI-S705", f"task {task_id} is done: there is nothing to recover")
            checkpointed = set(s.scalars(select(Checkpoint.round).where(Checkpoint.task_id == task_id)))
            last = max(checkpointed, default=-1)
            reopened = []
            for r in s.scalars(select(Round).where(Round.task_id == task_id).order_by(Round.round)):
                if r.round in checkpointed:
                    r.status = "committed"
                elif r.round > last:
                    r.status, r.deadline, r.extensions, r.closed_at = "collecting", deadline, 0, None
                    reopened.append(r.round)
            task.status = "running"
            return reopened

    # updates
    def accept(self, task_id: str, round_no: int, update: StoredUpdate) -> bool:
        """Store an accepted update; False if this device already contributed to this round.

        Inside `group_commit()` the row only joins the group (True): it is durable once the group commits.
        """
        row = {
            "task_id": task_id,
            "round": round_no,
            "device_id": update.device_id,
            "kind": update.kind,
            "n_samples": update.n_samples,
            "train_loss": update.train_loss,
            "body": update.body,
            "meta": update.meta,
            "received_at": time.time(),
            "body_sha256": hashlib.sha256(update.body).hexdigest(),
            "body_bytes": len(update.body),
            "segment_offset": None,
        }
        if self.segments is not None:
            row["segment_offset"] = self.segments.append(task_id, round_no, update.body)
            row["body"] = b""
        if self._group is not None:
            self._group.append(row)
            return True
        return self._commit_updates([row]) == 1

    @contextmanager
    def group_commit(self) -> Iterator[None]:
        """Accepted updates inside the block are written in one transaction, one sync, when it ends.

        The service acknowledges the messages of a group to the broker only after this returns: one disk
        sync per group instead of one per update, and nothing acknowledged before it is durable.
        """
        if self._group is not None:
            yield  # already in a group: the outer one commits
            return
        self._group = []
        try:
            yield
            if self._group:
                self._commit_updates(self._group)
        finally:
            self._group = None

    def _commit_updates(self, rows: list[dict[str, Any]]) -> int:
        """The bodies' segments synced first, then the rows that point into them committed."""
        if self.segments is not None:
            self.segments.sync()
        return self._insert_updates(rows)

    @retried
    def _insert_updates(self, rows: list[dict[str, Any]]) -> int:
        """Insert rows in one transaction (one executemany); rows whose (task, round, device) is stored are skipped.

        Skipping makes a retry after a COMMIT that landed unseen harmless; returns how many were new.
        """
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(AcceptedUpdate), rows)
            return len(rows)
        except IntegrityError:
            pass
        with self.engine.begin() as conn:
            stored = set(
                conn.execute(
                    select(AcceptedUpdate.round, AcceptedUpdate.device_id).where(
                        AcceptedUpdate.task_id == rows[0]["task_id"],
                        AcceptedUpdate.round.in_({r["round"] for r in rows}),
                    )
                ).tuples()
            )
            new = [r for r in rows if (r["round"], r["device_id"]) not in stored]
            if new:
                conn.execute(insert(AcceptedUpdate), new)
            return len(new)

    def accepted(self, task_id: str, round_no: int) -> Iterator[StoredUpdate]:
        """Accepted updates in arrival order, one row at a time (bodies are not all held at once)."""
        for seq in self._accepted_seqs(task_id, round_no):
            yield self._accepted_row(seq)

    @retried
    def _accepted_seqs(self, task_id: str, round_no: int) -> list[int]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(AcceptedUpdate.seq)
                    .where(AcceptedUpdate.task_id == task_id, AcceptedUpdate.round == round_no)
                    .order_by(AcceptedUpdate.seq)
                )
            )

    @retried
    def _accepted_row(self, seq: int) -> StoredUpdate:
        with self.session() as s:
            row = s.get(AcceptedUpdate, seq)
            assert row is not None
        body = row.body
        if row.segment_offset is not None and row.pruned_at is None:
            assert self.segments is not None and row.body_bytes is not None
            body = self.segments.read(row.task_id, row.round, row.segment_offset, row.body_bytes, row.body_sha256)
        return StoredUpdate(row.device_id, row.kind, row.n_samples, row.train_loss, body, row.meta)

    @retried
    def accepted_devices(self, task_id: str, round_no: int) -> set[str]:
        with self.session() as s:
            return set(
                s.scalars(
                    select(AcceptedUpdate.device_id).where(
                        AcceptedUpdate.task_id == task_id, AcceptedUpdate.round == round_no
                    )
                )
            )

    @retried
    def reject(self, task_id: str, round_no: int | None, device_id: str, code: str, reason: str) -> None:
        with self.session() as s, s.begin():
            s.add(Rejection(task_id=task_id, round=round_no, device_id=device_id, code=code, reason=reason))

    @retried
    def rejections(self, task_id: str) -> list[Rejection]:
        with self.session() as s:
            return list(s.scalars(select(Rejection).where(Rejection.task_id == task_id).order_by(Rejection.id)))

    # checkpoints and metrics
    @retried
    def commit_round(
        self,
        task_id: str,
        round_no: int,
        model_version: str,
        spec: str,
        model: bytes,
        strategy_state: bytes,
        closed_at: float,
        meta: str = "{}",
    ) -> None:
        """Checkpoint the new global model and mark the round committed, in one transaction.

        Idempotent: after a retry whose first COMMIT landed, finding this very checkpoint is success.
        """
        try:
            self._commit_round(task_id, round_no, model_version, spec, model, strategy_state, closed_at, meta)
        except IntegrityError:
            existing = self.checkpoint(task_id, round_no)
            if existing is None or existing.model_version != model_version:
                raise
            self.update_round(task_id, round_no, status="committed", closed_at=closed_at)

    def _commit_round(
        self,
        task_id: str,
        round_no: int,
        model_version: str,
        spec: str,
        model: bytes,
        strategy_state: bytes,
        closed_at: float,
        meta: str,
    ) -> None:
        with self.session() as s, s.begin():
            s.add(
                Checkpoint(
                    task_id=task_id,
                    round=round_no,
                    model_version=model_version,
                    spec=spec,
                    model=model,
                    strategy_state=strategy_state,
                    meta=meta,
                )
            )
            r = s.scalars(select(Round).where(Round.task_id == task_id, Round.round == round_no)).one()
            r.status, r.closed_at = "committed", closed_at

    @retried
    def latest_checkpoint(self, task_id: str) -> Checkpoint | None:
        with self.session() as s:
            return s.scalars(
                select(Checkpoint).where(Checkpoint.task_id == task_id).order_by(Checkpoint.round.desc()).limit(1)
            ).first()

    @retried
    def checkpoint(self, task_id: str, round_no: int) -> Checkpoint | None:
        with self.session() as s:
            return s.scalars(
                select(Checkpoint).where(Checkpoint.task_id == task_id, Checkpoint.round == round_no)
            ).first()

    @retried
    def record_evaluation(self, evaluation: Evaluation) -> bool:
        """Store one site's evaluation of a model; False if that site already reported on it."""
        try:
            with self.session() as s, s.begin():
                s.add(evaluation)
        except IntegrityError:
            return False
        return True

    @retried
    def evaluated_devices(self, task_id: str, model_version: str) -> set[str]:
        """The devices that reported on one model (ids only: the final round asks this after every message)."""
        with self.session() as s:
            return set(
                s.scalars(
                    select(Evaluation.device_id).where(
                        Evaluation.task_id == task_id, Evaluation.model_version == model_version
                    )
                )
            )

    @retried
    def evaluations(self, task_id: str) -> list[Evaluation]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(Evaluation)
                    .where(Evaluation.task_id == task_id)
                    .order_by(Evaluation.round, Evaluation.device_id)
                )
            )

    # enrollment tokens (coordinator/enrollment.py): only their SHA-256 is stored
    @retried
    def add_tokens(self, token_hashes: list[str], site: str, expires_at: float) -> None:
        with self.session() as s, s.begin():
            s.add_all(EnrollmentToken(token_hash=h, site=site, expires_at=expires_at) for h in token_hashes)

    @retried
    def claim_token(self, token_hash: str, now: float) -> EnrollmentToken:
        """Mark a live token used, atomically (two requests with one token: one wins); raise if it is not live."""
        with self.session() as s, s.begin():
            claimed = s.execute(
                update(EnrollmentToken)
                .where(
                    EnrollmentToken.token_hash == token_hash,
                    EnrollmentToken.used_at.is_(None),
                    EnrollmentToken.expires_at > now,
                )
                .values(used_at=now)
            )
            row = s.get(EnrollmentToken, token_hash)
            # The lookup is by primary key; compare the whole hash once more in constant time.
            if row is None or not hmac.compare_digest(row.token_hash, token_hash):
                raise CoordinatorError("FHAI-N030", "unknown enrollment token: check it was copied whole")
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                if row.used_at is not None:
                    raise CoordinatorError("FHAI-N031", "this enrollment token was already used: ask for a new one")
                raise CoordinatorError("FHAI-N032", "this enrollment token has expired: ask for a new one")
            return row

    @retried
    def complete_token(self, token_hash: str, device_id: str, profile: str) -> None:
        with self.session() as s, s.begin():
            row = s.get(EnrollmentToken, token_hash)
            if row is not None:
                row.device_id, row.profile = device_id, profile

    @retried
    def release_token(self, token_hash: str) -> None:
        """Give a claimed token back (the enrollment failed on our side, not the device's)."""
        with self.session() as s, s.begin():
            row = s.get(EnrollmentToken, token_hash)
            if row is not None and row.device_id is None:
                row.used_at = None

    @retried
    def live_tokens(self, now: float) -> int:
        with self.session() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(EnrollmentToken)
                    .where(EnrollmentToken.used_at.is_(None), EnrollmentToken.expires_at > now)
                )
                or 0
            )

    @retried
    def tokens(self) -> list[EnrollmentToken]:
        with self.session() as s:
            return list(s.scalars(select(EnrollmentToken).order_by(EnrollmentToken.created_at)))

    @retried
    def expire_tokens(self, hash_prefix: str, now: float) -> int:
        """End the life of the unused tokens whose hash starts with `hash_prefix` (as `tokens list` shows it)."""
        if len(hash_prefix) < 8:
            raise CoordinatorError("FHAI-N043", "give at least 8 characters of the token's hash")
        with self.session() as s, s.begin():
            result = s.execute(
                update(EnrollmentToken)
                .where(
                    EnrollmentToken.token_hash.startswith(hash_prefix.lower()),
                    EnrollmentToken.used_at.is_(None),
                    EnrollmentToken.expires_at > now,
                )
                .values(expires_at=now)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]
