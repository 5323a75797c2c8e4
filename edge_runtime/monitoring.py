"""Prometheus metrics of an edge runtime (opt-in: `fhai-edge run --metrics-port PORT`, bound to 127.0.0.1 by
default). Only timings and counts of this device's own work: the endpoint is for the hospital's monitoring,
and nothing here is sent to the coordinator (docs/privacy.md)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edge_runtime.errors import ConfigError

log = logging.getLogger("fhai.edge")

SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class EdgeMetrics:
    """Sync and training timings of one agent, on a registry of its own (several agents may share a process)."""

    def __init__(self, device_id: str, task: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"device": device_id, "task": task}
        self.sync_seconds = Histogram(
            "fhai_edge_sync_seconds",
            "Seconds to bring the FHIR data up to date and build the feature table",
            list(labels),
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.rows = Gauge(
            "fhai_edge_rows", "Patients (rows) in the last feature table", list(labels), registry=self.registry
        ).labels(**labels)
        self.train_seconds = Histogram(
            "fhai_edge_train_seconds",
            "Seconds of local training in one round",
            list(labels),
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.trained_rows = Counter(
            "fhai_edge_trained_rows", "Rows trained on, summed over rounds", list(labels), registry=self.registry
        ).labels(**labels)
        self._server: Any = None

    def synced(self, seconds: float, rows: int) -> None:
        self.sync_seconds.observe(seconds)
        self.rows.set(rows)

    def trained(self, seconds: float, rows: int) -> None:
        self.train_seconds.observe(seconds)
        self.trained_rows.inc(rows)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (port 0: any free port); returns the port."""
        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                "FHAI-O402", f"cannot serve metrics on {host}:{port} ({exc.strerror}): choose another --metrics-port"
            ) from exc
        bound = int(self._server.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
