"""The coordinator process: the MQTT shell around one task's RoundManager.

Inbound QoS 1 messages are acknowledged only after the manager has stored what they carried
(manual ack), and the session is persistent: updates published while the coordinator is down wait
at the broker, and one killed between storing and acknowledging gets a redelivery, which the store's
(task, round, device) uniqueness turns into a no-op.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.lease import TaskLease, claim_task
from coordinator.rounds import RoundManager
from coordinator.store import Store
from coordinator.task import TaskDefinition
from edge_runtime import wire
from edge_runtime.mqtt import BrokerSettings, Connection, Inbound, connect

if TYPE_CHECKING:
    from coordinator.metrics import CoordinatorMetrics

log = logging.getLogger("fhai.coordinator")

KEY_REFRESH_S = 2.0
MAX_BATCH = 64  # messages stored with one disk sync (group commit) and acknowledged together


class CoordinatorService:
    def __init__(
        self,
        store: Store,
        task: TaskDefinition,
        key: Ed25519PrivateKey,
        broker: BrokerSettings,
        work_dir: Path,
        client_id: str | None = None,
    ) -> None:
        self.store = store
        self.task = task
        self.key = key
        self.work_dir = work_dir
        self.broker = broker
        self.client_id = client_id or f"fhai-coordinator-{task.task}"
        self.conn: Connection | None = None
        self.manager = RoundManager(store, task, key, self._publish, work_dir / "spill")
        self.metrics: CoordinatorMetrics | None = None  # opt-in Prometheus counters (coordinator/metrics.py)

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        assert self.conn is not None
        kind = wire.peek_header(payload)["kind"]
        self.conn.publish(topic, payload, retain=retain, kind=kind, wait_s=30)

    def _dispatch(self, msg: Inbound) -> None:
        parts = msg.topic.split("/")
        if msg.topic.startswith(f"{wire.PREFIX}/devices/") and parts[-1] == "status":
            self.manager.handle_status(msg.topic, msg.payload)
        elif len(parts) == 6 and parts[4] == "updates":
            self.manager.handle_update(msg.topic, msg.payload)
        elif len(parts) == 6 and parts[4] == "eval":
            self.manager.handle_eval(msg.topic, msg.payload)

    @staticmethod
    def _next_batch(conn: Connection) -> list[Inbound]:
        """What is waiting in the inbox (at least one message, or none after 0.1 s), up to MAX_BATCH."""
        try:
            batch = [conn.inbox.get(timeout=0.1)]
        except queue.Empty:
            return []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(conn.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def run(
        self,
        stop: threading.Event | None = None,
        on_tick: Callable[[RoundManager], None] | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Run the task until it is done or failed (or `stop`); returns the task's final status."""
        stop = stop or threading.Event()
        task = self.task.task
        # The task's lease first: a second coordinator must be refused before it takes the broker session.
        lease = claim_task(self.store, task, self.key, self.work_dir)
        try:
            return self._run(lease, stop, on_tick, timeout_s)
        finally:
            lease.release()

    def _run(
        self,
        lease: TaskLease,
        stop: threading.Event,
        on_tick: Callable[[RoundManager], None] | None,
        timeout_s: float | None,
    ) -> str:
        task = self.task.task
        self.conn = connect(
            self.client_id,
            self.broker,
            [
                f"{wire.PREFIX}/tasks/{task}/updates/+",
                f"{wire.PREFIX}/tasks/{task}/eval/+",
                f"{wire.PREFIX}/devices/+/status",
            ],
            manual_ack=True,
        )
        self.manager.start()
        started = time.monotonic()
        last_keys = 0.0
        try:
            while not stop.is_set() and not self.manager.done:
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    log.error("task %s did not finish within %.0fs", task, timeout_s)
                    return "timeout"
                if time.monotonic() - last_keys > KEY_REFRESH_S:
                    self.manager.refresh_keys()  # devices enrolled or revoked meanwhile
                    lease.check()
                    last_keys = time.monotonic()
                batch = self._next_batch(self.conn)
                with self.store.group_commit():  # one disk sync for the whole batch
                    for msg in batch:
                        handled_at = time.perf_counter()
                        self._dispatch(msg)
                        if self.metrics is not None:
                            self.metrics.message(msg.topic, len(msg.payload), time.perf_counter() - handled_at)
                for msg in batch:
                    self.conn.ack(msg)  # only now: what they carried is in the store
                ticked_at = time.perf_counter()
                self.manager.tick()
                if self.metrics is not None:
                    self.metrics.ticked(self.manager, time.perf_counter() - ticked_at)
                if on_tick is not None:
                    on_tick(self.manager)
        finally:
            self.conn.close()
        row = self.store.get_task(task)
        return row.status if row else "unknown"
