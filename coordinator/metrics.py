"""Prometheus metrics of a running coordinator (opt-in: `fhai-coordinator run --metrics-port PORT`).

What the store keeps is read from it at each scrape, so those counts are exact and survive a restart:
rounds committed, updates accepted (and their bytes), updates rejected by code. What only this process
sees is counted here: bytes received per message kind, seconds to validate, store and fold one message,
seconds of the step that closed a round (aggregation, checkpoint, exports), and who is online.
Scrape config and metric list: docs/operations.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from coordinator.errors import CoordinatorError
from coordinator.rounds import RoundManager
from coordinator.store import AcceptedUpdate, Rejection, Round

log = logging.getLogger("fhai.coordinator")

# Seconds to handle one message: most take milliseconds; a spilled robust aggregation or a slow disk more.
HANDLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
CLOSE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def message_kind(topic: str) -> str:
    """updates, eval or status: the part of the topic that says what a device sent."""
    parts = topic.split("/")
    if parts[-1] == "status":
        return "status"
    return parts[4] if len(parts) == 6 and parts[4] in ("updates", "eval") else "other"


class _StoreCollector(Collector):
    """Counts from the store and the round manager, taken when Prometheus scrapes."""

    def __init__(self, manager: RoundManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        task = m.task.task
        with m.store.session() as s:
            rounds = s.execute(
                select(Round.phase, func.count())
                .where(Round.task_id == task, Round.status == "committed")
                .group_by(Round.phase)
            ).all()
            accepted = s.execute(
                select(
                    AcceptedUpdate.kind,
                    func.count(),
                    func.coalesce(
                        func.sum(func.coalesce(AcceptedUpdate.body_bytes, func.length(AcceptedUpdate.body))), 0
                    ),
                )
                .where(AcceptedUpdate.task_id == task)
                .group_by(AcceptedUpdate.kind)
            ).all()
            rejected = s.execute(
                select(Rejection.code, func.count()).where(Rejection.task_id == task).group_by(Rejection.code)
            ).all()
        committed = CounterMetricFamily(
            "fhai_coordinator_rounds_committed", "Rounds committed", labels=["task", "phase"]
        )
        for phase, n in rounds:
            committed.add_metric([task, phase], n)
        yield committed
        ok = CounterMetricFamily("fhai_coordinator_updates_accepted", "Updates accepted", labels=["task", "kind"])
        ok_bytes = CounterMetricFamily(
            "fhai_coordinator_accepted_bytes", "Bytes of the accepted updates' bodies", labels=["task", "kind"]
        )
        for kind, n, size in accepted:
            ok.add_metric([task, kind], n)
            ok_bytes.add_metric([task, kind], int(size))
        yield ok
        yield ok_bytes
        bad = CounterMetricFamily(
            "fhai_coordinator_updates_rejected",
            "Updates and evaluations rejected, by error code (the reasons: fhai-coordinator status)",
            labels=["task", "code"],
        )
        for code, n in rejected:
            bad.add_metric([task, code], n)
        yield bad
        yield from self._round_gauges(task)

    def _round_gauges(self, task: str) -> Iterator[Metric]:
        m = self.manager
        state = m.state
        online = GaugeMetricFamily(
            "fhai_coordinator_devices_online", "Devices whose presence is online", labels=["task"]
        )
        online.add_metric([task], len(m.online))
        yield online
        row = state.row if state else None
        number = GaugeMetricFamily("fhai_coordinator_round", "Number of the open (or last) round", labels=["task"])
        cohort = GaugeMetricFamily("fhai_coordinator_round_cohort", "Devices asked in the open round", labels=["task"])
        answered = GaugeMetricFamily(
            "fhai_coordinator_round_accepted", "Contributions accepted in the open round", labels=["task"]
        )
        left = GaugeMetricFamily(
            "fhai_coordinator_round_seconds_left", "Seconds to the open round's deadline", labels=["task"]
        )
        if row is not None and state is not None:
            number.add_metric([task], row.round)
            cohort.add_metric([task], len(state.cohort))
            answered.add_metric([task], len(state.accepted))
            if row.status == "collecting":
                left.add_metric([task], max(0.0, row.deadline - m.clock()))
        yield from (number, cohort, answered, left)


class CoordinatorMetrics:
    """The coordinator's metrics on one registry, served over HTTP by `serve`."""

    def __init__(self, manager: RoundManager) -> None:
        self.registry = CollectorRegistry()
        self.task = manager.task.task
        self.registry.register(_StoreCollector(manager))
        self.received = Counter(
            "fhai_coordinator_received_bytes",
            "Bytes of MQTT payloads received, by message kind",
            ["task", "kind"],
            registry=self.registry,
        )
        self.handle_seconds = Histogram(
            "fhai_coordinator_handle_seconds",
            "Seconds to validate, store and fold one received message, by kind",
            ["task", "kind"],
            buckets=HANDLE_BUCKETS,
            registry=self.registry,
        )
        self.close_seconds = Histogram(
            "fhai_coordinator_round_close_seconds",
            "Seconds of the step that committed a round: aggregation, checkpoint and exports",
            ["task"],
            buckets=CLOSE_BUCKETS,
            registry=self.registry,
        )
        self._model_round = manager.model_round
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def message(self, topic: str, size: int, seconds: float) -> None:
        kind = message_kind(topic)
        self.received.labels(self.task, kind).inc(size)
        self.handle_seconds.labels(self.task, kind).observe(seconds)

    def ticked(self, manager: RoundManager, seconds: float) -> None:
        """After each tick of the manager: a tick that committed a round is timed."""
        if manager.model_round != self._model_round:
            self._model_round = manager.model_round
            self.close_seconds.labels(self.task).observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (port 0: any free port); returns the port."""
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise CoordinatorError(
                "FHAI-O401", f"cannot serve metrics on {host}:{port} ({exc.strerror}): choose another --metrics-port"
            ) from exc
        bound = int(self._server.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
