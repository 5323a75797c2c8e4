"""The edge agent: joins a task over MQTT, and for each round it is selected for, pulls its
hospital's records, trains, and sends back a signed, quantized update. Nothing else leaves.

Messages arrive on paho's network thread and are queued; all work happens on the caller's thread.
The training kernels release the GIL (kernels.py), so a long training run never stalls the keepalive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError

from edge_runtime import codec, wire
from edge_runtime.deployment import Deployment
from edge_runtime.downlink import Held, ModelFollower
from edge_runtime.errors import EdgeError
from edge_runtime.inference import ModelCard
from edge_runtime.keys import load_or_create_signing_key, public_from_hex
from edge_runtime.messages import Announcement, ArtifactHeader, model_body, model_from_body, parse_header, stats_body
from edge_runtime.metrics import evaluate, score_histograms
from edge_runtime.model import Model
from edge_runtime.mqtt import BrokerError, BrokerSettings, Connection, connect
from edge_runtime.profile import DeviceProfile, training_bytes
from edge_runtime.rebuild import RebuildError, rebuild_artifact
from edge_runtime.round_log import RoundLog
from edge_runtime.site_data import SiteData, SourceConfig
from edge_runtime.trainer import TrainConfig, train, warm_up_in_background
from fhir_adapters.errors import FhirAdapterError
from fhir_adapters.features import FeatureTable
from fhir_adapters.featurespec import FeatureSpec, parse_spec

if TYPE_CHECKING:
    from edge_runtime.monitoring import EdgeMetrics

log = logging.getLogger("fhai.edge")


@dataclass
class AgentConfig:
    device_id: str
    task: str
    state_dir: Path
    source: SourceConfig
    profile: DeviceProfile
    coordinator_key: str  # hex Ed25519 public key: only frames it signed are obeyed
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    exit_when_done: bool = True
    retry_s: float = 15.0  # after a failed attempt (FHIR server down, token expired), try the round again
    metrics: EdgeMetrics | None = None  # opt-in Prometheus metrics (edge_runtime/monitoring.py)


@dataclass
class LocalSplit:
    X_train: np.ndarray
    y_train: np.ndarray
    X_hold: np.ndarray
    y_hold: np.ndarray
    columns: list[str]
    units: list[str | None]


def holdout_mask(patient_ids: list[str], device_id: str, fraction: float) -> np.ndarray:
    """A patient's split is fixed by a hash of their id, so it is stable as new patients arrive."""
    cut = int(fraction * 2**32)
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{device_id}/{pid}".encode()).digest()[:4], "little") < cut
            for pid in patient_ids
        ],
        dtype=bool,
    )


def split_table(table: FeatureTable, device_id: str, fraction: float) -> LocalSplit:
    hold = holdout_mask(table.patient_ids, device_id, fraction)
    return LocalSplit(
        table.X[~hold],
        table.y[~hold].astype(np.int64),
        table.X[hold],
        table.y[hold].astype(np.int64),
        list(table.columns),
        list(table.units),
    )


def round_seed(device_id: str, task: str, round_no: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{task}/{device_id}/{round_no}".encode()).digest()[:4], "little")


def stats_message(ann: Announcement, split: LocalSplit) -> tuple[dict[str, object], bytes]:
    """The stats round's header and body: per-column sums and sums of squares of the training rows."""
    X = split.X_train.astype(np.float64)
    header = {
        "task": ann.task,
        "round": ann.round,
        "n": len(X),
        "n_features": X.shape[1],
        "columns": split.columns,
        "units": split.units,
    }
    return header, stats_body(X.sum(0), (X**2).sum(0))


def eval_header(ann: Announcement, model: Model, split: LocalSplit) -> dict[str, object] | None:
    """The evaluation of the current global model on the held-out rows (None without held-out rows)."""
    if len(split.y_hold) == 0:
        return None
    proba = model.predict_proba(split.X_hold)
    metrics = evaluate(split.y_hold, proba)
    pos, neg = score_histograms(split.y_hold, proba[:, 1] if proba.shape[1] == 2 else proba.max(1))
    return {
        "task": ann.task,
        "round": ann.round - 1,  # the round that produced the model being evaluated
        "model_version": model.version(),
        "metrics": {k: float(v) for k, v in metrics.items() if np.isfinite(v)},
        "pos_hist": pos.tolist(),
        "neg_hist": neg.tolist(),
    }


class EdgeAgent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        wire.check_device_id(cfg.device_id)
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key = load_or_create_signing_key(cfg.state_dir / "device.key")
        self.coordinator = public_from_hex(cfg.coordinator_key)
        self.data = SiteData(cfg.source, cfg.state_dir)
        self.announcement: Announcement | None = None
        self.rounds = RoundLog(cfg.state_dir / f"progress-{cfg.task}.json")
        self.residual_file = cfg.state_dir / f"residual-{cfg.task}.npy"
        self.model_file = cfg.state_dir / f"model-{cfg.task}.bin"  # the held global model, to resume from
        self.follower = ModelFollower(self._load_held())
        self._syncing: list[str] = []  # catch-up topics subscribed while the held model is behind
        self._skeleton: tuple[ArtifactHeader, bytes] | None = None  # an export to rebuild once its model is held
        self._fetching_artifact = False
        self._split: tuple[str, LocalSplit] | None = None
        self.conn: Connection | None = None
        self.finished = threading.Event()
        self.deployment = Deployment(cfg.state_dir, cfg.task, cfg.profile)
        self._retry_at: float | None = None
        self._said: tuple[int, float, str] | None = None  # the last "not selected"/"missed" line, said once

    @property
    def model(self) -> Model | None:
        """The global model as the coordinator's reference copy has it, bit for bit."""
        return self.follower.model

    def _load_held(self) -> Held | None:
        meta = self.model_file.with_suffix(".json")
        if not (self.model_file.exists() and meta.exists()):
            return None
        try:
            info = json.loads(meta.read_text())
            model = model_from_body(info["spec"], self.model_file.read_bytes())
        except (OSError, ValueError, KeyError, EdgeError) as exc:
            log.warning("ignoring the saved global model (%s); the keyframe will replace it", exc)
            return None
        if model.version() != info.get("model_version"):
            log.warning("the saved global model does not match its hash; the keyframe will replace it")
            return None
        return Held(model, int(info["round"]))

    def _save_held(self) -> None:
        held = self.follower.held
        if held is None:
            return
        for path, data in (
            (self.model_file, model_body(held.model)),
            (
                self.model_file.with_suffix(".json"),
                json.dumps(
                    {"round": held.round, "model_version": held.model.version(), "spec": held.model.spec.to_dict()}
                ).encode(),
            ),
        ):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

    # MQTT ----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Serve rounds until the task ends (or `stop` is set)."""
        stop = stop or threading.Event()
        warm_up_in_background()  # Numba's load overlaps the broker connection and the first FHIR sync
        device, task = self.cfg.device_id, self.cfg.task
        presence = wire.status_topic(device)
        self.conn = connect(
            f"fhai-edge-{device}",
            self.cfg.broker,
            [wire.announce_topic(task), wire.model_topic(task), wire.artifact_topic(task, self.deployment.format)],
            will=(presence, json.dumps({"state": "offline"}).encode()),
            online=(presence, json.dumps({"state": "online", "profile": self.cfg.profile.profile}).encode()),
        )
        # A catch-up subscription a previous process left in the persistent session would bring every
        # republished keyframe and chain: drop them; this process subscribes again if it falls behind.
        for topic in (wire.model_key_topic(task), wire.model_chain_topic(task)):
            self.conn.unsubscribe(topic)
        self.conn.unsubscribe(wire.artifact_full_topic(task, self.deployment.format))
        try:
            while not stop.is_set() and not self.finished.is_set():
                try:
                    msg = self.conn.inbox.get(timeout=0.2)
                except queue.Empty:
                    if self._retry_at is not None and time.monotonic() >= self._retry_at:
                        self._retry_at = None
                        self._attempt("retry", self.work)
                    continue
                self.handle(msg.topic, msg.payload)
        finally:
            if self.conn is not None:
                # A clean exit: say so, since the broker only sends the Will on an unclean one.
                try:
                    offline = json.dumps({"state": "offline"}).encode()
                    self.conn.publish(presence, offline, retain=True, wait_s=5, content_type="application/json")
                except BrokerError as exc:
                    log.warning("could not publish the offline status: %s", exc)
                self.conn.close()

    def _attempt(self, what: str, step: Callable[[], None]) -> None:
        """Run one step; on a failure log it and schedule a retry instead of leaving the task."""
        try:
            step()
        except (EdgeError, FhirAdapterError, ValidationError) as exc:
            log.error("%s: %s (trying again in %.0fs)", what, exc, self.cfg.retry_s)
            self._retry_at = time.monotonic() + self.cfg.retry_s

    def handle(self, topic: str, payload: bytes) -> None:
        self._attempt(topic, lambda: self._handle(topic, payload))

    def _handle(self, topic: str, payload: bytes) -> None:
        frame = wire.decode_frame(payload, lambda s: self.coordinator if s == wire.COORDINATOR else None)
        if frame.kind == "model":
            self._on_model(topic, frame)
        elif frame.kind == "announce":
            self.announcement = parse_header(frame, Announcement)
            self.deployment.save_feature_spec(self.announcement.feature_spec, self.announcement.feature_spec_hash)
        elif frame.kind == "artifact":
            self._on_artifact(parse_header(frame, ArtifactHeader), frame.body)
            return
        else:
            raise wire.WireError("FHAI-W030", f"unexpected {frame.kind} frame on {topic}")
        self.work()

    def _on_model(self, topic: str, frame: wire.Frame) -> None:
        """Move the held model with a live patch, or catch up from the retained keyframe and chain."""
        task, follower = self.cfg.task, self.follower
        try:
            if topic == wire.model_key_topic(task):
                changed = follower.on_keyframe(frame)
            elif topic == wire.model_chain_topic(task):
                changed = follower.on_chain(frame)
            else:
                changed = follower.on_live(frame)
        finally:
            self._sync_subscriptions()
        if changed:
            self._save_held()
            assert follower.held is not None
            log.info("global model %s of round %d", follower.held.model.version(), follower.held.round)
            self._rebuild_export()

    def _sync_subscriptions(self) -> None:
        """Subscribe to the catch-up topics while behind (the chain first, when a held copy may patch forward)."""
        if self.conn is None:
            return
        task, follower = self.cfg.task, self.follower
        wanted: list[str] = []
        if follower.needs_sync:
            wanted = [wire.model_chain_topic(task)]
            if follower.held is None or follower.chain_fell_short:
                wanted.append(wire.model_key_topic(task))
        for topic in wanted:
            if topic not in self._syncing:
                log.info("catching up on the global model: subscribing to %s", topic)
                self.conn.subscribe(topic)
        for topic in self._syncing:
            if topic not in wanted:
                self.conn.unsubscribe(topic)
        self._syncing = wanted

    def _on_artifact(self, header: ArtifactHeader, body: bytes) -> None:
        if header.delivery == "full":
            self._install(header, body)
            if self._fetching_artifact and self.conn is not None:
                self.conn.unsubscribe(wire.artifact_full_topic(self.cfg.task, self.deployment.format))
                self._fetching_artifact = False
            if self._skeleton is not None and self._skeleton[0].round <= header.round:
                self._skeleton = None
            return
        self._skeleton = (header, body)
        self._rebuild_export()

    def _rebuild_export(self) -> None:
        """Rebuild a float export from the held parameters; fetch the whole artifact if that cannot work."""
        if self._skeleton is None:
            return
        header, packed = self._skeleton
        model = self.follower.recent.get(header.model_version)
        held = self.follower.held
        if model is None and (held is None or held.round < header.round):
            return  # the model it was exported from has not arrived yet
        try:
            if model is None:
                raise RebuildError(
                    "FHAI-L814", f"model {header.model_version} of round {header.round} is not held here"
                )
            data = rebuild_artifact(packed, header.holes, model, ModelCard.from_dict(header.card).artifact_sha256)
        except RebuildError as exc:
            log.warning("%s", exc)
            self._skeleton = None
            if self.conn is not None and not self._fetching_artifact:
                self.conn.subscribe(wire.artifact_full_topic(self.cfg.task, self.deployment.format))
                self._fetching_artifact = True
            return
        self._skeleton = None
        self._install(header, data)
        log.info("rebuilt the round-%d %s export from the held parameters", header.round, header.format)

    def _install(self, header: ArtifactHeader, body: bytes) -> None:
        """Swap the inference model, if it was built for this device's features."""
        if header.format != self.deployment.format:
            raise wire.WireError(
                "FHAI-W031", f"artifact in format {header.format}, this device runs {self.deployment.format}"
            )
        card = ModelCard.from_dict(header.card)
        spec_hash = self.announcement.feature_spec_hash if self.announcement else None
        columns = self._split[1].columns if self._split else None
        self.deployment.install(body, card, spec_hash, columns)

    # one round -----------------------------------------------------------------------------------
    def work(self) -> None:
        ann = self.announcement
        if ann is None or ann.task != self.cfg.task:
            return
        if ann.round in self.rounds.handled():
            if ann.final and self.cfg.exit_when_done:
                self.finished.set()
            return
        if self.cfg.device_id not in ann.cohort:
            self._say_once(ann, "not selected", lambda: log.info("round %d: not selected", ann.round))
            return
        if time.time() > ann.deadline:
            self.rounds.record(ann.round, ann.phase, "missed")
            self._say_once(
                ann,
                "missed",
                lambda: log.warning("round %d: deadline passed before this device could start", ann.round),
            )
            return
        if ann.phase != "stats" and (self.model is None or self.model.version() != ann.model_version):
            return  # the matching global model has not arrived yet
        spec = parse_spec(ann.feature_spec)
        if spec.spec_hash() != ann.feature_spec_hash:
            raise EdgeError("FHAI-G001", "the announced feature spec does not match its hash: refusing the round")
        split = self._local_split(ann, spec)
        if ann.phase == "stats":
            self._send_stats(ann, split)
        else:
            assert self.model is not None
            self._send_eval(ann, split)
            if ann.phase == "train":
                self._send_update(ann, split)
        on_time = time.time() <= ann.deadline
        if not on_time:
            log.warning(
                "round %d: sent after the deadline; the coordinator drops it unless the round is still open", ann.round
            )
        self.rounds.record(ann.round, ann.phase, "sent" if on_time else "late")
        if ann.final and self.cfg.exit_when_done:
            self.finished.set()

    def _say_once(self, ann: Announcement, what: str, say: Callable[[], None]) -> None:
        """Announcement and model frames both wake `work`: say a round's non-event once, not per frame."""
        if self._said != (ann.round, ann.deadline, what):
            self._said = (ann.round, ann.deadline, what)
            say()

    def _local_split(self, ann: Announcement, spec: FeatureSpec) -> LocalSplit:
        # File sources do not change between rounds; a FHIR mirror is synced each round.
        if self._split is None or self._split[0] != ann.feature_spec_hash or self.cfg.source.kind == "fhir":
            synced_at = time.perf_counter()
            table = self.data.table(spec)
            if self.cfg.metrics is not None:
                self.cfg.metrics.synced(time.perf_counter() - synced_at, len(table.patient_ids))
            self._split = (
                ann.feature_spec_hash,
                split_table(table, self.cfg.device_id, self.cfg.profile.holdout_fraction),
            )
        return self._split[1]

    def _publish(self, topic: str, kind: str, header: dict[str, object], body: bytes, ann: Announcement) -> None:
        assert self.conn is not None
        frame = wire.encode_frame(kind, self.cfg.device_id, header, body, self.key)
        if len(frame) > ann.max_update_bytes:
            raise EdgeError(
                "FHAI-G003",
                f"the {kind} frame has {len(frame)} bytes, over the task's limit of {ann.max_update_bytes}: "
                "quantize harder (quantization_bits in the device profile) or ask for a larger limit",
            )
        self.conn.publish(topic, frame, expiry_s=int(ann.deadline - time.time()) + 60, kind=kind, wait_s=30)

    def _send_stats(self, ann: Announcement, split: LocalSplit) -> None:
        header, body = stats_message(ann, split)
        self._publish(wire.update_topic(ann.task, self.cfg.device_id), "stats", header, body, ann)
        log.info("round %d: sent feature statistics of %d rows", ann.round, len(split.X_train))

    def _send_eval(self, ann: Announcement, split: LocalSplit) -> None:
        assert self.model is not None
        header = eval_header(ann, self.model, split)
        if header is not None:
            self._publish(wire.eval_topic(ann.task, self.cfg.device_id), "eval", header, b"", ann)

    def train_config(self, ann: Announcement) -> TrainConfig:
        merged = {**ann.train, **self.cfg.profile.train, **ann.train_required}
        merged["seed"] = round_seed(self.cfg.device_id, ann.task, ann.round)
        return TrainConfig(**merged)

    def _fit_budget(self, split: LocalSplit, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
        """Subsample rows (seeded) when the full set would not fit the profile's memory budget."""
        assert self.model is not None
        spec = self.model.spec
        budget = self.cfg.profile.memory_budget_mb * 2**20
        n = len(split.y_train)

        def need(rows: int) -> int:
            return training_bytes(
                rows, spec.n_features, spec.layout().size, config.epochs, config.batch_size, max(spec.widths)
            )

        if need(n) <= budget:
            return split.X_train, split.y_train
        rows = n
        while rows > 1 and need(rows) > budget:
            rows //= 2
        if need(rows) > budget:
            raise EdgeError(
                "FHAI-G002",
                f"even one row exceeds the memory budget of {self.cfg.profile.memory_budget_mb} MB: raise it in the device profile",
            )
        log.warning("memory budget: training on %d of %d rows (raise memory_budget_mb to use all)", rows, n)
        idx = np.random.default_rng(config.seed).choice(n, rows, replace=False)
        return split.X_train[idx], split.y_train[idx]

    def _send_update(self, ann: Announcement, split: LocalSplit) -> None:
        assert self.model is not None
        config = self.train_config(ann)
        X, y = self._fit_budget(split, config)
        trained_at = time.perf_counter()
        result = train(self.model, X, y, config, global_params=self.model.params)
        if self.cfg.metrics is not None:
            self.cfg.metrics.trained(time.perf_counter() - trained_at, len(y))
        delta = (result.model.params - self.model.params).astype(np.float32)
        n = delta.size
        feedback = (
            codec.ErrorFeedback.load(self.residual_file)
            if self.residual_file.exists()
            else codec.ErrorFeedback.zeros(n)
        )
        if feedback.n != n:
            feedback = codec.ErrorFeedback.zeros(n)
        compensated = feedback.compensate(delta)
        bits = self.cfg.profile.quantization_bits or ann.codec.bits
        # The codec's stochastic rounding draws from its own stream, apart from training's.
        rounding = np.random.default_rng([config.seed, 1])
        body = codec.encode(compensated, bits, rounding, ann.codec.block_size, ann.codec.compress)
        feedback.update(compensated, codec.decode(body, expected_n=n))
        header = {
            "task": ann.task,
            "round": ann.round,
            "model_version": ann.model_version,
            "n_samples": len(y),
            "train_loss": float(result.epoch_losses[-1]),
        }
        self._publish(wire.update_topic(ann.task, self.cfg.device_id), "update", header, body, ann)
        feedback.save(self.residual_file)
        log.info(
            "round %d: sent %d-bit update (%d bytes) from %d rows, loss %.4f",
            ann.round,
            bits,
            len(body),
            len(y),
            result.epoch_losses[-1],
        )
