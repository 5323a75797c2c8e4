"""The coordinator store's tables (SQLAlchemy models) and the one migration it needs: new nullable columns."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    inspect,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

log = logging.getLogger("fhai.store")


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    site: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    definition: Mapped[str] = mapped_column(Text)  # the task as JSON
    status: Mapped[str] = mapped_column(String(16), default="running")  # running, done, failed
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("task_id", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"))
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(8))
    # open -> collecting -> aggregating -> committed (or failed)
    status: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(32))  # the global model this round starts from
    cohort: Mapped[str] = mapped_column(Text)  # JSON list of device ids
    deadline: Mapped[float] = mapped_column(Float)
    extensions: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[float] = mapped_column(Float, default=time.time)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AcceptedUpdate(Base):
    __tablename__ = "updates"
    # One accepted contribution per (task, round, device): a QoS 1 redelivery is a no-op.
    __table_args__ = (UniqueConstraint("task_id", "round", "device_id"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    device_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # update or stats
    n_samples: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)  # empty once retention dropped it (coordinator/retention.py)
    meta: Mapped[str] = mapped_column(Text, default="{}")  # stats: the sender's columns and units (JSON)
    received_at: Mapped[float] = mapped_column(Float, default=time.time)
    # Kept for audit when the body is dropped: which bytes were folded in.
    body_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # SQLite stores: the body is at this offset of its round's segment file (coordinator/segments.py), not in `body`.
    segment_offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    body_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pruned_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Rejection(Base):
    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    device_id: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float, default=time.time)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("task_id", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)  # the round whose commit produced this model
    model_version: Mapped[str] = mapped_column(String(32))
    spec: Mapped[str] = mapped_column(Text)
    model: Mapped[bytes] = mapped_column(LargeBinary)  # edge_runtime.messages.model_body layout
    strategy_state: Mapped[bytes] = mapped_column(LargeBinary)
    meta: Mapped[str] = mapped_column(Text, default="{}")  # JSON: the feature columns and units
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Evaluation(Base):
    """One site's report on one global model: its metrics and score histograms (for pooled AUROC)."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("task_id", "model_version", "device_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)  # the round that produced the model (0: initial model)
    model_version: Mapped[str] = mapped_column(String(32))
    device_id: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[str] = mapped_column(Text)  # JSON
    pos_hist: Mapped[bytes] = mapped_column(LargeBinary)  # int64 little-endian counts
    neg_hist: Mapped[bytes] = mapped_column(LargeBinary)
    at: Mapped[float] = mapped_column(Float, default=time.time)


class TaskCoordinator(Base):
    """Which coordinator key a task runs with (devices trust only it), and who holds the task's lease now."""

    __tablename__ = "task_coordinators"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    work_dir: Mapped[str] = mapped_column(Text, default="")  # where that key lives
    holder: Mapped[str] = mapped_column(Text, default="{}")  # JSON: host, pid, work dir, since (coordinator/lease.py)
    bound_at: Mapped[float] = mapped_column(Float, default=time.time)


@dataclass(frozen=True)
class StoredUpdate:
    device_id: str
    kind: str
    n_samples: int
    train_loss: float | None
    body: bytes
    meta: str = "{}"


class EnrollmentToken(Base):
    """A one-time enrollment token, by the SHA-256 of its text (the token itself is never stored)."""

    __tablename__ = "enrollment_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    device_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # who enrolled with it
    profile: Mapped[str | None] = mapped_column(Text, nullable=True)  # the device profile it sent (JSON)


def add_missing_columns(engine: Engine, metadata: MetaData) -> None:
    """Add the nullable columns a newer version declares to a store an older one created (no other migration)."""
    inspector = inspect(engine)
    existing_tables = set(inspector.get_table_names())
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            if table.name not in existing_tables:
                continue
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')
                    log.info("store: added column %s.%s", table.name, column.name)
