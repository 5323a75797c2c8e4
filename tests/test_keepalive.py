"""A device stays connected while it trains: the kernels release the GIL, so paho keeps pinging."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from coordinator.broker import LocalBroker
from edge_runtime.model import Model, ModelSpec, Standardizer
from edge_runtime.mqtt import BrokerSettings, connect
from edge_runtime.trainer import TrainConfig, train

KEEPALIVE_S = 1  # Mosquitto drops a client silent for 1.5 keepalives


def _problem(rows: int, features: int) -> tuple[Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=rows) > 0).astype(np.int64)
    model = Model.create(
        ModelSpec(features, (256, 256), 2), 0, Standardizer.from_moments(rows, X.sum(0), (X**2).sum(0))
    )
    return model, X, y


@pytest.mark.timeout(180)
def test_training_longer_than_the_keepalive_keeps_the_session(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    model, X, y = _problem(4000, 40)
    train(model, X[:64], y[:64], TrainConfig(epochs=1))  # compile (or load) the kernels first
    t0 = time.perf_counter()
    train(model, X, y, TrainConfig(epochs=1))
    per_epoch = time.perf_counter() - t0
    epochs = max(1, int(np.ceil(4 * KEEPALIVE_S / per_epoch)))

    caplog.set_level(logging.INFO, logger="fhai.mqtt")
    conn = connect("fhai-edge-trainer", BrokerSettings("127.0.0.1", broker.port, keepalive=KEEPALIVE_S), [])
    try:
        t0 = time.perf_counter()
        train(model, X, y, TrainConfig(epochs=epochs))  # on this thread, as the agent does it
        took = time.perf_counter() - t0
        assert took > 3 * KEEPALIVE_S, f"training took {took:.1f}s: too short to test the keepalive"
        assert conn.connected.is_set()
        conn.publish("fhai/v1/test/alive", b"still here", qos=1, wait_s=5)
    finally:
        conn.close()
    broker_log = broker.log_file.read_text()
    assert "fhai-edge-trainer" in broker_log
    assert "exceeded timeout" not in broker_log, broker_log
    assert not [r for r in caplog.records if "lost the broker" in r.getMessage()]
    assert sum("fhai-edge-trainer connected" in r.getMessage() for r in caplog.records) == 1
