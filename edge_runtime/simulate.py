"""Many lightweight devices in one process, for tests and benchmarks of the coordinator at scale.

Each simulated device is what the coordinator sees of a real one: its own MQTT v5 session (client id,
presence with a Last Will, QoS 1 publishes), its own Ed25519 key, and frames made by the real wire format
and codec. What is shared is what would only cost memory or CPU without changing a byte on the wire:
the training data (one feature table built once from `--data`), the check of frames every device receives
(a frame with the same bytes verifies the same way, so it is verified once), the evaluation of a global
model on that shared data, and a few network threads (edge_runtime/netloop.py) instead of one per device.

Updates are either trained for real (`train`: the trainer on the shared table, seeded per device and round)
or cheap (`noise`: a seeded Gaussian delta, so thousands of devices answer in seconds). Devices keep no
error-feedback state. Keys derive from (seed, device id), so the fleet's public keys are known up front:
`keys_csv()` lists them for `fhai-coordinator devices import`.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime import codec, wire
from edge_runtime.agent import LocalSplit, eval_header, round_seed, split_table, stats_message
from edge_runtime.downlink import ModelFollower
from edge_runtime.keys import public_from_hex, public_hex
from edge_runtime.messages import Announcement, parse_header
from edge_runtime.model import Model
from edge_runtime.mqtt import SESSION_EXPIRY_S, BrokerSettings
from edge_runtime.netloop import NetLoop
from edge_runtime.site_data import SiteData, SourceConfig
from edge_runtime.trainer import TrainConfig, train
from fhir_adapters.featurespec import parse_spec

log = logging.getLogger("fhai.edge.simulate")

UpdateSource = Literal["noise", "train"]
HOLDOUT_FRACTION = 0.2


def device_key(seed: int, device_id: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"fhai-sim/{seed}/{device_id}".encode()).digest())


@dataclass
class SimDevice:
    device_id: str
    key: Ed25519PrivateKey
    client: mqtt.Client
    announcement: Announcement | None = None
    cohort: frozenset[str] = frozenset()
    model: Model | None = None
    done: set[int] = field(default_factory=set)
    connected: bool = False


@dataclass
class FleetStats:
    connected: int = 0
    sent: int = 0
    acked: int = 0
    disconnects: int = 0
    rounds_done: dict[int, int] = field(default_factory=dict)


class Fleet:
    """N simulated devices of one task; `start()`, then `wait_final()` or `stop()`."""

    def __init__(
        self,
        n: int,
        task: str,
        broker: BrokerSettings,
        coordinator_key: str,
        data: SourceConfig,
        *,
        prefix: str = "sim-",
        seed: int = 0,
        update: UpdateSource = "noise",
        threads: int = 4,
        workers: int = 2,
        state_dir: Path | None = None,
    ) -> None:
        self.task, self.broker, self.seed, self.update = task, broker, seed, update
        self.coordinator = public_from_hex(coordinator_key)
        self._tmp = tempfile.TemporaryDirectory(prefix="fhai-sim-") if state_dir is None else None
        self.site = SiteData(data, state_dir if state_dir is not None else Path(self._tmp.name))  # type: ignore[union-attr]
        width = max(4, len(str(n - 1)))
        self.loops = [NetLoop(f"fhai-sim-net-{i}") for i in range(max(1, threads))]
        self.devices = [self._device(f"{prefix}{i:0{width}d}", self.loops[i % len(self.loops)]) for i in range(n)]
        self.stats = FleetStats()
        self._inbox: queue.SimpleQueue[tuple[SimDevice, str, bytes] | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"fhai-sim-work-{i}", daemon=True) for i in range(workers)
        ]
        self._lock = threading.Lock()
        self._frames: dict[bytes, tuple[bytes, Any]] = {}  # signature -> (payload, parsed), verified once
        # Every device follows the same model frames, so one follower (the quantized downlink's device side)
        # applies each of them once for the whole fleet.
        self._follower = ModelFollower()
        self._follow_lock = threading.Lock()
        self._split: tuple[str, LocalSplit] | None = None
        self._evals: dict[tuple[str, int], dict[str, object] | None] = {}
        self._ids = frozenset(d.device_id for d in self.devices)
        self._final_target: dict[int, int] = {}  # final round -> how many of this fleet's devices it asks
        self.final_done = threading.Event()

    def keys_csv(self) -> str:
        """device_id,public_key lines for `fhai-coordinator devices import`."""
        return "".join(f"{d.device_id},{public_hex(d.key)}\n" for d in self.devices)

    # connections ---------------------------------------------------------------------------------
    def _device(self, device_id: str, loop: NetLoop) -> SimDevice:
        wire.check_device_id(device_id)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fhai-edge-{device_id}", protocol=mqtt.MQTTv5)
        device = SimDevice(device_id, device_key(self.seed, device_id), client)
        if self.broker.username:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.ca_file:
            client.tls_set(ca_certs=self.broker.ca_file)
        presence = wire.status_topic(device_id)
        client.will_set(presence, b'{"state": "offline"}', qos=1, retain=True)
        client.max_queued_messages_set(1000)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.error("broker refused %s: %s", device_id, reason)
                return
            model_topics = (wire.model_topic, wire.model_key_topic, wire.model_chain_topic)
            c.subscribe([(wire.announce_topic(self.task), 1), *((t(self.task), 1) for t in model_topics)])
            c.publish(presence, b'{"state": "online", "profile": "simulated"}', qos=1, retain=True)
            device.connected = True
            with self._lock:
                self.stats.connected += 1

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            lost = reason != 0  # 0: our own disconnect() at the end
            with self._lock:
                self.stats.connected -= device.connected
                self.stats.disconnects += lost
            device.connected = False
            if lost:
                log.warning("%s lost the broker (%s)", device_id, reason)
                loop.lost(client)

        def on_publish(_c: mqtt.Client, _u: Any, _mid: int, _reason: Any, _p: Any) -> None:
            with self._lock:
                self.stats.acked += 1

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_message = lambda _c, _u, msg: self._inbox.put((device, msg.topic, bytes(msg.payload)))
        loop.attach(client)
        return device

    def start(self, connect_timeout_s: float = 120.0) -> Fleet:
        """Connect every device (persistent sessions), then serve rounds in the background."""
        # Load the codec's compiled kernels now, not in the first training round (seconds on a busy machine).
        codec.decode(codec.encode(np.zeros(8, np.float32), 8, np.random.default_rng(0)), 8)
        for loop in self.loops:
            loop.start()
        for w in self._workers:
            w.start()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        for device in self.devices:
            device.client.connect(
                self.broker.host, self.broker.port, self.broker.keepalive, clean_start=False, properties=props
            )
        deadline = time.monotonic() + connect_timeout_s
        while self.stats.connected < len(self.devices) and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("%d of %d simulated devices connected", self.stats.connected, len(self.devices))
        return self

    def stop(self) -> None:
        for device in self.devices:
            if device.connected:
                device.client.publish(wire.status_topic(device.device_id), b'{"state": "offline"}', qos=1, retain=True)
                device.client.disconnect()
        time.sleep(0.5)  # let the loops write the last packets
        for loop in self.loops:
            loop.stop()
        for _ in self._workers:
            self._inbox.put(None)
        if self._tmp is not None:
            self._tmp.cleanup()

    def wait_final(self, timeout_s: float, progress: Callable[[FleetStats], None] | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.final_done.wait(0.25):
            if progress is not None:
                progress(self.stats)
            if time.monotonic() > deadline:
                return False
        return True

    # rounds --------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (item := self._inbox.get()) is not None:
            device, topic, payload = item
            try:
                self._handle(device, topic, payload)
            except Exception:  # one bad frame must not stop the simulated fleet
                log.exception("%s: handling %s failed", device.device_id, topic)

    def _verified(self, topic: str, payload: bytes) -> Any:
        """The parsed frame (an announcement, or the model a model frame leads to), checked once per payload."""
        signature = payload[-wire.SIGNATURE_LEN :]
        with self._lock:
            hit = self._frames.get(signature)
        if hit is not None and hit[0] == payload:
            return hit[1]
        frame = wire.decode_frame(payload, lambda s: self.coordinator if s == wire.COORDINATOR else None)
        if frame.kind == "announce":
            parsed: Any = parse_header(frame, Announcement)
            parsed = (parsed, frozenset(parsed.cohort))
        elif frame.kind == "model":
            with self._follow_lock:
                if topic == wire.model_key_topic(self.task):
                    self._follower.on_keyframe(frame)
                elif topic == wire.model_chain_topic(self.task):
                    self._follower.on_chain(frame)
                else:
                    self._follower.on_live(frame)
                parsed = self._follower.model
        else:
            raise wire.WireError("FHAI-W030", f"unexpected {frame.kind} frame")
        with self._lock:
            self._frames[signature] = (payload, parsed)
        return parsed

    def _handle(self, device: SimDevice, topic: str, payload: bytes) -> None:
        parsed = self._verified(topic, payload)
        if parsed is None or isinstance(parsed, Model):
            device.model = self._follower.model  # the newest the fleet's follower reached
        else:
            device.announcement, device.cohort = parsed
        ann = device.announcement
        if ann is None or ann.task != self.task or ann.round in device.done:
            return
        if device.device_id not in device.cohort or time.time() > ann.deadline:
            return
        if ann.phase != "stats" and (device.model is None or device.model.version() != ann.model_version):
            return  # the matching global model has not arrived yet
        split = self._local_split(ann)
        if ann.phase == "stats":
            header, body = stats_message(ann, split)
            self._send(device, wire.update_topic(ann.task, device.device_id), "stats", header, body, ann)
        else:
            assert device.model is not None
            evaluation = self._evaluation(ann, device.model, split)
            if evaluation is not None:
                self._send(device, wire.eval_topic(ann.task, device.device_id), "eval", evaluation, b"", ann)
            if ann.phase == "train":
                self._send_update(device, ann, split)
        device.done.add(ann.round)
        with self._lock:
            done = self.stats.rounds_done[ann.round] = self.stats.rounds_done.get(ann.round, 0) + 1
            if ann.final:
                target = self._final_target.setdefault(ann.round, len(device.cohort & self._ids))
                if done >= target:
                    self.final_done.set()

    def _local_split(self, ann: Announcement) -> LocalSplit:
        with self._lock:
            if self._split is None or self._split[0] != ann.feature_spec_hash:
                spec = parse_spec(ann.feature_spec)
                if spec.spec_hash() != ann.feature_spec_hash:
                    raise wire.WireError("FHAI-G001", "the announced feature spec does not match its hash")
                self._split = (ann.feature_spec_hash, split_table(self.site.table(spec), "simulated", HOLDOUT_FRACTION))
            return self._split[1]

    def _evaluation(self, ann: Announcement, model: Model, split: LocalSplit) -> dict[str, object] | None:
        key = (model.version(), ann.round)
        with self._lock:
            if key not in self._evals:
                self._evals[key] = eval_header(ann, model, split)
            return self._evals[key]

    def _send_update(self, device: SimDevice, ann: Announcement, split: LocalSplit) -> None:
        assert device.model is not None
        seed = round_seed(device.device_id, ann.task, ann.round)
        n = device.model.params.size
        if self.update == "train":
            config = TrainConfig(**{**ann.train, **ann.train_required, "seed": seed})
            result = train(device.model, split.X_train, split.y_train, config, global_params=device.model.params)
            delta = (result.model.params - device.model.params).astype(np.float32)
            loss = float(result.epoch_losses[-1])
        else:
            delta = np.random.default_rng(seed).normal(0.0, 0.01, n).astype(np.float32)
            loss = 0.5
        body = codec.encode(
            delta, ann.codec.bits, np.random.default_rng([seed, 1]), ann.codec.block_size, ann.codec.compress
        )
        header = {
            "task": ann.task,
            "round": ann.round,
            "model_version": ann.model_version,
            "n_samples": len(split.y_train),
            "train_loss": loss,
        }
        self._send(device, wire.update_topic(ann.task, device.device_id), "update", header, body, ann)

    def _send(
        self, device: SimDevice, topic: str, kind: str, header: dict[str, object], body: bytes, ann: Announcement
    ) -> None:
        frame = wire.encode_frame(kind, device.device_id, header, body, device.key)
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = wire.CONTENT_TYPE
        props.MessageExpiryInterval = max(1, int(ann.deadline - time.time()) + 60)
        props.UserProperty = [("fhai-kind", kind), ("fhai-protocol", "1")]
        device.client.publish(topic, frame, qos=1, properties=props)
        with self._lock:
            self.stats.sent += 1
