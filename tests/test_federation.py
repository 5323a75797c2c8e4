"""Whole federations on a real Mosquitto: rounds complete, survive drops and restarts, refuse bad updates."""

from __future__ import annotations

import json
import signal
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.aggregation import build_strategy
from coordinator.aggregation.state import decode_state
from coordinator.broker import LocalBroker
from coordinator.report import metric_rows, pooled_by_round
from coordinator.store import Checkpoint
from edge_runtime import codec, wire
from edge_runtime.keys import load_signing_key
from edge_runtime.messages import model_from_body
from edge_runtime.model import Model
from tests.harness import Federation, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def federation_factory(tmp_path: Path, broker: LocalBroker) -> Iterator[object]:
    made: list[Federation] = []

    def make(sites: dict[str, Path], name: str, store_url: str | None = None, **overrides: object) -> Federation:
        fed = Federation(tmp_path / name, broker, sites, name, store_url, **overrides)
        fed.enroll_all()
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.stop()


def _model(cp: Checkpoint) -> Model:
    return model_from_body(json.loads(cp.spec), cp.model)


def replay(fed: Federation) -> np.ndarray:
    """An uninterrupted coordinator fed the same accepted updates: fold them round by round from round 0."""
    store, task = fed.store, fed.task.task
    cp0 = store.checkpoint(task, 0)
    assert cp0 is not None
    params = _model(cp0).params
    strategy = build_strategy(fed.task.strategy)
    for r in range(1, fed.task.rounds + 1):
        with strategy.new_accumulator(params.size, fed.root / "replay-spill") as acc:
            for u in store.accepted(task, r):
                acc.add(codec.decode(u.body, params.size), float(u.n_samples))
            params = strategy.aggregate(params, acc)
    return params


def test_three_devices_train_a_model_together(federation_factory, three_sites) -> None:  # type: ignore[no-untyped-def]
    fed: Federation = federation_factory(three_sites, "fed3", rounds=3)
    fed.start_devices()
    fed.start_coordinator_thread()
    fed.wait_done()

    rounds = fed.store.rounds(fed.task.task)
    assert [(r.round, r.phase, r.status) for r in rounds] == [
        (0, "stats", "committed"),
        (1, "train", "committed"),
        (2, "train", "committed"),
        (3, "train", "committed"),
        (4, "eval", "committed"),
    ]
    for r in range(1, 4):
        assert fed.store.accepted_devices(fed.task.task, r) == set(three_sites)
    assert fed.store.rejections(fed.task.task) == []
    # The global model learns: pooled held-out AUROC after the last round beats the initial model's.
    pooled = pooled_by_round(metric_rows(fed.store.evaluations(fed.task.task)))
    assert set(pooled) == {0, 1, 2, 3}
    assert pooled[3].auroc > pooled[0].auroc + 0.1
    assert pooled[3].n == sum(
        r.n for r in metric_rows(fed.store.evaluations(fed.task.task)) if r.round == 3 and r.site != "pooled"
    )
    # The committed chain is exactly FedAvg over the accepted updates.
    final = fed.store.latest_checkpoint(fed.task.task)
    assert final is not None
    np.testing.assert_array_equal(_model(final).params, replay(fed))
    # Every device finished on its own once the final evaluation was announced.
    for agent in fed.agents.values():
        assert agent.finished.wait(30)


def test_a_device_that_drops_mid_round_does_not_block_the_quorum(federation_factory, site_folders) -> None:  # type: ignore[no-untyped-def]
    fed: Federation = federation_factory(site_folders, "drop", rounds=2, min_updates=3, round_deadline_s=6)
    dropper = "site-d"
    fed.start_devices(**{dropper: {"hold_round": 2, "hang": True}})
    fed.start_coordinator_thread()
    fed.agents[dropper].reached.wait(60)
    fed.agents[dropper].gate.set()  # it leaves without sending round 2's update
    fed.wait_done()
    accepted = fed.store.accepted_devices(fed.task.task, 2)
    assert accepted == set(site_folders) - {dropper}
    round2 = next(r for r in fed.store.rounds(fed.task.task) if r.round == 2)
    assert dropper in json.loads(round2.cohort)
    assert round2.status == "committed"


def test_broker_restart_mid_round(federation_factory, three_sites, broker: LocalBroker) -> None:  # type: ignore[no-untyped-def]
    fed: Federation = federation_factory(three_sites, "restart", rounds=2)
    held = "site-c"
    fed.start_devices(**{held: {"hold_round": 1}})
    fed.start_coordinator_thread()
    fed.agents[held].reached.wait(60)
    wait_for(lambda: len(fed.store.accepted_devices(fed.task.task, 1)) == 2, 60, "two round-1 updates")
    broker.restart()  # same port; sessions and retained messages come back from its persistence file
    fed.agents[held].gate.set()  # published while the clients are still reconnecting
    fed.wait_done()
    for r in (1, 2):
        assert fed.store.accepted_devices(fed.task.task, r) == set(three_sites)


def test_coordinator_sigkill_mid_round_resumes_without_loss_or_double_count(
    federation_factory, three_sites, store_url
) -> None:  # type: ignore[no-untyped-def]
    fed: Federation = federation_factory(
        three_sites, "crash", store_url, rounds=3, strategy={"name": "fedadam", "server_lr": 0.05}
    )
    held = "site-c"
    fed.start_devices(**{held: {"hold_round": 2}})
    first = fed.start_coordinator_process()
    fed.agents[held].reached.wait(90)
    wait_for(lambda: len(fed.store.accepted_devices(fed.task.task, 2)) == 2, 90, "two round-2 updates")
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The held update is published while no coordinator runs: the broker keeps it for the session.
    fed.agents[held].gate.set()
    fed.start_coordinator_process()
    fed.wait_done(180)
    for r in (1, 2, 3):
        assert fed.store.accepted_devices(fed.task.task, r) == set(three_sites)
        assert len(list(fed.store.accepted(fed.task.task, r))) == 3
    final = fed.store.latest_checkpoint(fed.task.task)
    assert final is not None and final.round == 3
    # Same updates, uninterrupted: the same model, and FedAdam's server state agrees too.
    np.testing.assert_array_equal(_model(final).params, replay(fed))
    assert decode_state(final.strategy_state)["strategy"] == "fedadam"


def _publish_raw(fed: Federation, topic: str, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", fed.broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def _nan_body(n: int) -> bytes:
    """A well-formed 32-bit codec body (valid checksum) whose values are NaN."""
    good = codec.encode(np.zeros(n, np.float32), 32, np.random.default_rng(0))
    payload = np.full(n, np.nan, "<f4").tobytes()
    head = good[: codec.HEADER_SIZE - 4]
    return head + zlib.crc32(payload, zlib.crc32(head)).to_bytes(4, "little") + payload


def test_bad_updates_are_rejected_with_reasons_while_the_round_goes_on(federation_factory, three_sites) -> None:  # type: ignore[no-untyped-def]
    fed: Federation = federation_factory(three_sites, "attack", rounds=2)
    victim, laggard = "site-a", "site-b"
    captured: list[bytes] = []
    fed.start_devices(**{victim: {"hold_round": 1}, laggard: {"hold_round": 2}})
    fed.start_coordinator_thread()
    fed.agents[victim].reached.wait(60)
    wait_for(lambda: len(fed.store.accepted_devices(fed.task.task, 1)) == 2, 60, "two honest updates")
    assert fed.service is not None and fed.service.manager.device_model is not None
    model = fed.service.manager.device_model  # the copy the devices train from
    n = model.params.size
    version = model.version()
    key = load_signing_key(fed.device_key_path(victim))
    topic = wire.update_topic(fed.task.task, victim)

    def frame(header: dict[str, object], body: bytes, signer: Ed25519PrivateKey = key) -> bytes:
        base = {"task": fed.task.task, "round": 1, "model_version": version, "n_samples": 10, "train_loss": 0.5}
        return wire.encode_frame("update", victim, {**base, **header}, body, signer)

    good_body = codec.encode(np.zeros(n, np.float32), 8, np.random.default_rng(0))
    attacks = {
        "FHAI-W012": frame({}, good_body, signer=Ed25519PrivateKey.generate()),  # forged signature
        "FHAI-R006": frame({"round": 7}, good_body),  # wrong round
        "FHAI-C": frame({}, codec.encode(np.zeros(n + 3, np.float32), 8, np.random.default_rng(0))),  # shape
        "FHAI-C0": frame({}, _nan_body(n)),  # NaN values
        "FHAI-R002": frame({}, bytes(fed.service.manager.max_update_bytes() + 1)),  # oversized
    }
    for payload in attacks.values():
        _publish_raw(fed, topic, payload)
    wait_for(lambda: len(fed.store.rejections(fed.task.task)) >= len(attacks), 30, "the rejections")

    # Replays: the victim's real round-1 update replayed in round 2 is late; its round-2 update
    # replayed in round 2 is a duplicate. Both are refused, and neither is counted twice.
    sniffer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sniffer", protocol=mqtt.MQTTv5)
    sniffer.on_message = lambda _c, _u, msg: captured.append(bytes(msg.payload))
    sniffer.connect("127.0.0.1", fed.broker.port)
    sniffer.subscribe(topic, qos=1)
    sniffer.loop_start()
    wait_for(sniffer.is_connected, 10, "the sniffer")
    fed.agents[victim].gate.set()
    fed.agents[laggard].reached.wait(60)
    wait_for(lambda: victim in fed.store.accepted_devices(fed.task.task, 2), 60, "the victim's round-2 update")
    wait_for(lambda: len(captured) >= 2, 10, "both captured updates")
    sniffer.disconnect()
    sniffer.loop_stop()
    before = len(fed.store.rejections(fed.task.task))
    for payload in captured[:2]:
        _publish_raw(fed, topic, payload)
    wait_for(lambda: len(fed.store.rejections(fed.task.task)) >= before + 2, 30, "the replay rejections")
    fed.agents[laggard].gate.set()
    fed.wait_done()
    for r in (1, 2):
        assert fed.store.accepted_devices(fed.task.task, r) == set(three_sites)
        assert len(list(fed.store.accepted(fed.task.task, r))) == 3

    rejections = fed.store.rejections(fed.task.task)
    codes = [r.code for r in rejections]
    assert "FHAI-W012" in codes and "FHAI-R002" in codes
    assert codes.count("FHAI-R006") == 2  # the wrong-round frame and the late replay
    assert codes.count("FHAI-R010") == 1  # the duplicate
    codec_rejections = [r for r in rejections if r.code.startswith("FHAI-C") or r.code == "FHAI-R013"]
    assert len(codec_rejections) == 2, [(r.code, r.reason) for r in rejections]
    assert all(r.reason for r in rejections)
    # The round's model is FedAvg of the three honest updates only.
    final = fed.store.latest_checkpoint(fed.task.task)
    assert final is not None
    np.testing.assert_array_equal(_model(final).params, replay(fed))
