"""The quantized downlink over a real Mosquitto: every device holds the coordinator's reference copy bit for bit,
every round, and a device that joins late catches up from the retained keyframe and chain."""

from __future__ import annotations

import contextlib
import queue
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.artifact_delivery import artifact_frames
from coordinator.broker import LocalBroker
from edge_runtime import wire
from edge_runtime.agent import AgentConfig, EdgeAgent
from edge_runtime.downlink import Held, ModelFollower
from edge_runtime.keys import public_hex
from edge_runtime.model import Model, ModelSpec, Standardizer
from edge_runtime.mqtt import BrokerSettings, Connection, connect
from edge_runtime.profile import DeviceProfile
from edge_runtime.site_data import SourceConfig
from tests.harness import Federation, wait_for

pytestmark = pytest.mark.timeout(300)


def test_devices_hold_the_announced_model_every_round_and_a_late_device_catches_up(
    tmp_path: Path, broker: LocalBroker, three_sites: dict[str, Path]
) -> None:
    fed = Federation(
        tmp_path / "dl",
        broker,
        three_sites,
        "dl",
        rounds=4,
        cohort_size=2,
        min_updates=2,
        downlink={"bits": 8, "keyframe_every": 2},
        export={"formats": []},
    )
    fed.enroll_all()
    late = "site-c"
    try:
        fed.start_devices(only=[s for s in three_sites if s != late])
        fed.start_coordinator_thread(timeout_s=240)
        task = fed.task.task
        wait_for(lambda: (row := fed.store.current_round(task)) is not None and row.round >= 3, 180, "round 3")
        fed.start_devices(only=[late])
        fed.wait_done(240)
        manager = fed.service.manager  # type: ignore[union-attr]
        reference = manager.device_model
        assert reference is not None and manager.model is not None
        # The devices train from the reference copy; it is not the exact model (8-bit patches), but close.
        assert reference.version() != manager.model.version()
        assert np.abs(reference.params - manager.model.params).max() < 0.01 * np.abs(manager.model.params).max()
        rounds = {r.round: r for r in fed.store.rounds(task)}
        for site, agent in fed.agents.items():
            wait_for(lambda a=agent: a.model is not None and a.model.version() == reference.version(), 30, site)
            np.testing.assert_array_equal(agent.model.params, reference.params)  # type: ignore[union-attr]
            adopted = agent.adopted
            # Every model a device held is the one the coordinator announced for the round after it.
            for r, version in adopted:
                assert rounds[r + 1].model_version == version, (site, r)
            if site != late:
                assert [r for r, _ in adopted] == [0, 1, 2, 3, 4], site
        # The late device started from the keyframe of round 2 (or later), not from the first model.
        first_round = fed.agents[late].adopted[0][0]
        assert first_round >= 2
        assert fed.store.rejections(task) == []
    finally:
        fed.stop()


def test_a_reconnect_does_not_download_the_retained_model_again_but_a_restarted_process_does(
    broker: LocalBroker,
) -> None:
    topic = "fhai/v1/tasks/rt/model"
    settings = BrokerSettings("127.0.0.1", broker.port)

    def publish(payload: bytes, retain: bool) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="coord", protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()

    def received(conn: Connection, wait: float = 3.0) -> list[bytes]:
        out = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                out.append(conn.inbox.get(timeout=0.1).payload)
        return out

    publish(b"model-1", retain=True)
    conn = connect("fhai-edge-rt", settings, [topic])
    assert received(conn) == [b"model-1"]
    broker.restart()  # the device is cut off; its session (and subscription) survive in the broker's persistence
    wait_for(lambda: conn.connected.wait(0.1), 30, "the reconnect")
    publish(b"model-2", retain=True)
    assert received(conn) == [b"model-2"]  # what was new, not the retained copy it already had
    conn.close()
    again = connect("fhai-edge-rt", settings, [topic])  # a restarted process lost what it knew: retained again
    assert received(again) == [b"model-2"]
    again.close()


def test_a_device_rebuilds_the_export_of_a_model_it_holds_and_fetches_one_it_does_not(
    tmp_path: Path, broker: LocalBroker, three_sites: dict[str, Path]
) -> None:
    """Over a real broker: a skeleton for the held model is filled in place; a skeleton for a model the device
    never held makes it fetch the whole retained artifact, once."""
    key = Ed25519PrivateKey.generate()
    spec = ModelSpec(4, (8,), 2)
    held, other = (Model.create(spec, seed, Standardizer.identity(4)) for seed in (1, 2))
    fields = {"name": "rb", "feature_spec_hash": "h" * 16, "columns": list("abcd"), "units": [None] * 4}
    cfg = AgentConfig(
        device_id="dev-rb",
        task="rb",
        state_dir=tmp_path / "dev",
        source=SourceConfig.parse(str(next(iter(three_sites.values())))),
        profile=DeviceProfile(profile="onnx-device", inference_backend="onnxruntime"),
        coordinator_key=public_hex(key),
        broker=BrokerSettings("127.0.0.1", broker.port),
    )
    agent = EdgeAgent(cfg)
    agent.follower = ModelFollower(Held(held, 2))
    agent.conn = connect("fhai-edge-dev-rb", cfg.broker, [])

    def signed(header: dict[str, object], body: bytes) -> bytes:
        return wire.encode_frame("artifact", wire.COORDINATOR, header, body, key)

    try:
        # The export of the held model: rebuilt from its parameters, nothing fetched.
        own = artifact_frames(held, ["onnx"], task="rb", round_no=2, reason="end", card_fields=fields)
        assert [o.full for o in own] == [True, False]
        agent.handle(wire.artifact_topic("rb", "onnx"), signed(own[1].header, own[1].body))
        assert agent.deployment.predictor is not None
        assert agent.deployment.predictor.card.model_version == held.version() and not agent._fetching_artifact
        # The export of a model this device never held: it subscribes to the whole artifact, retained there.
        theirs = artifact_frames(other, ["onnx"], task="rb", round_no=1, reason="improved", card_fields=fields)
        publisher = connect("coordinator-rb", cfg.broker, [])
        publisher.publish(wire.artifact_full_topic("rb", "onnx"), signed(theirs[0].header, theirs[0].body), retain=True)
        publisher.close()
        agent.handle(wire.artifact_topic("rb", "onnx"), signed(theirs[1].header, theirs[1].body))
        assert agent._fetching_artifact
        msg = agent.conn.inbox.get(timeout=20)
        assert msg.topic == wire.artifact_full_topic("rb", "onnx")
        agent.handle(msg.topic, msg.payload)
        assert agent.deployment.predictor.card.model_version == other.version() and not agent._fetching_artifact
        X = np.random.default_rng(0).normal(size=(20, 4))
        np.testing.assert_allclose(agent.deployment.predictor.predict_proba(X), other.predict_proba(X), atol=1e-5)
    finally:
        agent.conn.close()
