"""The round state machine of one task: open -> collecting -> aggregating -> committed.

It owns no socket: frames come in through `handle_update` / `handle_eval`, time through `tick`, and
everything it sends goes out through the `publish` callable. That keeps the MQTT shell thin and lets
tests drive the machine directly. Every decision that must survive a crash is in the store first.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator.aggregation import Strategy, UpdateAccumulator, build_strategy
from coordinator.aggregation.state import decode_state, encode_state
from coordinator.artifact_delivery import artifact_frames, improved
from coordinator.downlink import Downlink
from coordinator.errors import CoordinatorError, RejectedUpdateError
from coordinator.report import POOLED, metric_rows
from coordinator.retention import apply_retention
from coordinator.store import Evaluation, Round, Store, StoredUpdate
from coordinator.task import TaskDefinition
from edge_runtime import codec, wire
from edge_runtime.inference import save_model_files
from edge_runtime.keys import public_from_hex
from edge_runtime.messages import (
    Announcement,
    EvalHeader,
    StatsHeader,
    UpdateHeader,
    model_body,
    model_from_body,
    parse_header,
    stats_from_body,
)
from edge_runtime.metrics import HISTOGRAM_BINS
from edge_runtime.model import Model, Standardizer

log = logging.getLogger("fhai.coordinator")

Publisher = Callable[[str, bytes, bool], None]  # topic, payload, retain

# Frame overhead beyond the codec body: prefix, header and signature.
_FRAME_SLACK = 16 * 1024
MAX_SAMPLES_PER_UPDATE = 50_000_000
MAX_STATS_FEATURES = 65_536  # before round 0 closes the coordinator does not know the column count


@dataclass
class _Stats:
    n: int = 0
    n_features: int | None = None
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    columns: list[str] | None = None
    units: list[str | None] | None = None

    def add(self, n: int, n_features: int, total: np.ndarray, total_sq: np.ndarray) -> None:
        if self.n_features is None:
            self.n_features, self.total, self.total_sq = n_features, np.zeros(n_features), np.zeros(n_features)
        assert self.total is not None and self.total_sq is not None
        self.n += n
        self.total += total
        self.total_sq += total_sq


@dataclass
class RoundState:
    """What the manager holds in memory for the open round; rebuilt from the store on restart."""

    row: Round
    cohort: list[str]
    accumulator: UpdateAccumulator | None = None
    stats: _Stats = field(default_factory=_Stats)
    accepted: set[str] = field(default_factory=set)


class RoundManager:
    def __init__(
        self,
        store: Store,
        task: TaskDefinition,
        key: Ed25519PrivateKey,
        publish: Publisher,
        spill_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.task = task
        self.key = key
        self.publish = publish
        self.spill_dir = spill_dir
        self.clock = clock
        self.strategy: Strategy = build_strategy(task.strategy)
        self.spec_hash = task.spec().spec_hash()
        self.model: Model | None = None  # the exact global model the strategy moves
        self.model_round = -1
        # What the devices hold: the exact model at `downlink.bits: 32`, else the quantized downlink's reference.
        self.downlink = Downlink(task.downlink, task.task, task.seed)
        self._published: dict[str, str] = {}  # model topic channel -> ident of the frame retained there
        self.columns: list[str] = []  # the feature table's columns, as the sites reported them
        self.units: list[str | None] = []
        self.state: RoundState | None = None
        self.online: set[str] = set()
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._quorum_since: float | None = None

    # lifecycle -----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        row = self.store.get_task(self.task.task)
        return row is not None and row.status in ("done", "failed")

    def start(self) -> None:
        """Begin the task, or pick it up where a previous coordinator process left it."""
        self.refresh_keys()
        existing = self.store.get_task(self.task.task)
        if existing is None:
            self.store.add_task(self.task.task, self.task.model_dump_json())
            log.info("task %s created", self.task.task)
            return  # round 0 opens on the first tick with enough devices online
        if TaskDefinition.model_validate_json(existing.definition) != self.task:  # settings added since: defaults
            raise CoordinatorError(
                "FHAI-R001",
                f"task {self.task.task} is already in the store with a different definition: "
                "use a new task id, or the same YAML as before to resume",
            )
        self._load_checkpoint()
        row = self.store.current_round(self.task.task)
        if row is None or row.status in ("committed", "failed"):
            return
        self.state = RoundState(row, json.loads(row.cohort))
        self._refold()
        log.info(
            "resumed task %s in round %d (%s) with %d accepted updates",
            self.task.task,
            row.round,
            row.phase,
            len(self.state.accepted),
        )
        self._announce()

    def refresh_keys(self) -> None:
        self._keys = {d: public_from_hex(k) for d, k in self.store.device_keys().items()}

    def _load_checkpoint(self) -> None:
        cp = self.store.latest_checkpoint(self.task.task)
        if cp is None:
            return
        self.model = model_from_body(json.loads(cp.spec), cp.model)
        self.model_round = cp.round
        self.downlink.replay(self._committed_models(cp.round))
        self.strategy.load_state_dict(decode_state(cp.strategy_state))
        meta = json.loads(cp.meta)
        self.columns, self.units = meta.get("columns", []), meta.get("units", [])

    def _committed_models(self, last: int) -> Iterator[tuple[int, Model]]:
        for r in range(last + 1):
            cp = self.store.checkpoint(self.task.task, r)
            if cp is not None:
                yield r, model_from_body(json.loads(cp.spec), cp.model)

    @property
    def device_model(self) -> Model | None:
        """The global model as every device holds it (the one rounds train from and devices evaluate)."""
        return self.downlink.reference

    # opening rounds ------------------------------------------------------------------------------
    def _next_phase(self) -> tuple[int, str] | None:
        if self.model is None:
            return 0, "stats"
        if self.model_round < self.task.rounds:
            return self.model_round + 1, "train"
        return None

    def _eligible(self) -> list[str]:
        return sorted(d for d in self.online if d in self._keys)

    def _open(self, round_no: int, phase: str, extensions: int = 0) -> None:
        eligible = self._eligible()
        # Seeded by (task seed, round), so a restarted coordinator draws the same cohort.
        rng = random.Random(f"{self.task.seed}/{round_no}")
        cohort = sorted(rng.sample(eligible, min(self.task.cohort_size, len(eligible))))
        now = self.clock()
        row = Round(
            task_id=self.task.task,
            round=round_no,
            phase=phase,
            status="collecting",
            model_version=self.device_model.version() if self.device_model else "none",
            cohort=json.dumps(cohort),
            deadline=now + self.task.round_deadline_s,
            extensions=extensions,
            opened_at=now,
        )
        self.store.open_round(row)
        self.state = RoundState(row, cohort)
        self._new_accumulator()
        log.info(
            "round %d (%s) open: cohort %s, deadline in %.0fs", round_no, phase, cohort, self.task.round_deadline_s
        )
        self._announce()

    def _new_accumulator(self) -> None:
        assert self.state is not None
        if self.state.row.phase == "train":
            assert self.model is not None
            spill = self.spill_dir / f"{self.task.task}-r{self.state.row.round}"
            shutil.rmtree(spill, ignore_errors=True)  # a crashed run's spill file is re-made by the refold
            self.state.accumulator = self.strategy.new_accumulator(self.model.params.size, spill)

    def _announce(self) -> None:
        """Publish (retained) the global model's frames that changed, then the announcement that refers to it."""
        assert self.state is not None
        row = self.state.row
        topics = {
            "live": wire.model_topic(self.task.task),
            "key": wire.model_key_topic(self.task.task),
            "chain": wire.model_chain_topic(self.task.task),
        }
        for out in self.downlink.frames():
            if self._published.get(out.channel) != out.ident:
                frame = wire.encode_frame("model", wire.COORDINATOR, out.header, out.body, self.key)
                self.publish(topics[out.channel], frame, True)
                self._published[out.channel] = out.ident
        announcement = Announcement(
            task=self.task.task,
            round=row.round,
            phase=row.phase,
            model_version=row.model_version,
            deadline=row.deadline,
            cohort=self.state.cohort,
            train=self.task.train,
            train_required=self.strategy.client_config(row.round),
            codec=self.task.codec,
            feature_spec=self.task.feature_spec,
            feature_spec_hash=self.spec_hash,
            max_update_bytes=self.max_update_bytes(),
            final=row.phase == "eval",
        )
        frame = wire.encode_frame("announce", wire.COORDINATOR, announcement.model_dump(mode="json"), b"", self.key)
        self.publish(wire.announce_topic(self.task.task), frame, True)

    def max_update_bytes(self) -> int:
        n = self.model.params.size if self.model is not None else 0
        n_features = self.model.spec.n_features if self.model is not None else MAX_STATS_FEATURES
        # Largest legitimate body: float32 passthrough of every parameter (or stats: two float64 vectors).
        return max(4 * n, 16 * n_features) + _FRAME_SLACK

    # incoming frames -----------------------------------------------------------------------------
    def handle_update(self, topic: str, payload: bytes) -> bool:
        """Validate, persist and fold one update or stats frame. Returns True if accepted.

        Rejections are logged and stored with their reason; they never stop the round.
        """
        device = wire.device_from_topic(topic)
        round_no = self.state.row.round if self.state else None
        try:
            update, header_round, delta = self._validate(device, payload)
        except (RejectedUpdateError, wire.WireError, codec.CodecError) as exc:
            log.warning("rejected update from %s: %s", device, exc)
            self.store.reject(self.task.task, round_no, device, exc.code, exc.message)
            return False
        assert self.state is not None
        # `accepted` is exactly what the store holds for the open round (the restart re-folds it all, and one
        # coordinator holds the task's lease), so a redelivery or a replay is caught here, before any I/O.
        if update.device_id in self.state.accepted:
            log.info("duplicate update from %s for round %d ignored", device, header_round)
            self.store.reject(self.task.task, header_round, device, "FHAI-R010", "duplicate of an accepted update")
            return False
        # False would be this very update, whose COMMIT landed before a store outage hid it: it counts once.
        self.store.accept(self.task.task, header_round, update)
        self._fold(update, delta)
        log.info(
            "accepted %s from %s (%d samples), %d/%d",
            update.kind,
            device,
            update.n_samples,
            len(self.state.accepted),
            len(self.state.cohort),
        )
        return True

    def _validate(self, device: str, payload: bytes) -> tuple[StoredUpdate, int, np.ndarray | None]:
        if len(payload) > self.max_update_bytes():
            raise RejectedUpdateError(
                "FHAI-R002", f"payload of {len(payload)} bytes exceeds this task's limit of {self.max_update_bytes()}"
            )
        frame = wire.decode_frame(payload, self._keys.get, self.max_update_bytes())
        if frame.sender != device:
            raise RejectedUpdateError("FHAI-R003", f"frame signed by {frame.sender!r} arrived on {device!r}'s topic")
        state = self.state
        if state is None or state.row.status != "collecting":
            raise RejectedUpdateError("FHAI-R004", "no round is collecting updates now")
        row = state.row
        if frame.header.get("task") != self.task.task:
            raise RejectedUpdateError("FHAI-R005", f"update is for task {frame.header.get('task')!r}")
        if frame.header.get("round") != row.round:
            late = isinstance(frame.header.get("round"), int) and frame.header["round"] < row.round
            raise RejectedUpdateError(
                "FHAI-R006",
                f"update is for round {frame.header.get('round')}, round {row.round} is open"
                + (" (late: that round is closed)" if late else ""),
            )
        if device not in state.cohort:
            raise RejectedUpdateError("FHAI-R007", f"device {device} is not in round {row.round}'s cohort")
        if row.phase == "stats":
            if frame.kind != "stats":
                raise RejectedUpdateError("FHAI-R008", f"round {row.round} collects stats, got a {frame.kind} frame")
            stats = parse_header(frame, StatsHeader)
            if len(stats.columns) != stats.n_features or len(stats.units) != stats.n_features:
                raise RejectedUpdateError("FHAI-R011", "stats header lists a column count unlike n_features")
            if state.stats.columns not in (None, stats.columns):
                raise RejectedUpdateError(
                    "FHAI-R011",
                    f"device's feature columns {stats.columns} differ from the other sites' {state.stats.columns}: "
                    "its feature spec or runtime version differs from the task's",
                )
            stats_from_body(frame.body, stats.n_features)
            meta = json.dumps({"columns": stats.columns, "units": stats.units})
            return StoredUpdate(device, "stats", stats.n, None, frame.body, meta), row.round, None
        if frame.kind != "update":
            raise RejectedUpdateError("FHAI-R008", f"round {row.round} collects updates, got a {frame.kind} frame")
        header = parse_header(frame, UpdateHeader)
        if header.model_version != row.model_version:
            raise RejectedUpdateError(
                "FHAI-R009", f"update was trained from model {header.model_version}, round uses {row.model_version}"
            )
        if header.n_samples > MAX_SAMPLES_PER_UPDATE:
            raise RejectedUpdateError("FHAI-R012", f"implausible sample count {header.n_samples}")
        assert self.model is not None
        # The signature verified these exact bytes: the body's CRC could catch nothing more.
        delta = codec.decode(frame.body, expected_n=self.model.params.size, check_crc=False)
        if not np.isfinite(delta).all():
            raise RejectedUpdateError("FHAI-R013", "update holds non-finite values")
        return StoredUpdate(device, "update", header.n_samples, header.train_loss, frame.body), row.round, delta

    def _fold(self, update: StoredUpdate, delta: np.ndarray | None = None) -> None:
        """Fold an accepted update; `delta` is its decoded body when validation already decoded it."""
        assert self.state is not None
        self.state.accepted.add(update.device_id)
        if update.kind == "stats":
            n_features = len(update.body) // 16
            total, total_sq = stats_from_body(update.body, n_features)
            self.state.stats.add(update.n_samples, n_features, total, total_sq)
            meta = json.loads(update.meta)
            self.state.stats.columns, self.state.stats.units = meta["columns"], meta["units"]
        else:
            assert self.state.accumulator is not None and self.model is not None
            if delta is None:
                delta = codec.decode(update.body, self.model.params.size)
            self.state.accumulator.add(delta, float(update.n_samples))

    def _refold(self) -> None:
        """After a restart: fold the round's accepted updates again, in their arrival order."""
        assert self.state is not None
        self._new_accumulator()
        for update in self.store.accepted(self.task.task, self.state.row.round):
            self._fold(update)

    def handle_eval(self, topic: str, payload: bytes) -> bool:
        device = wire.device_from_topic(topic)
        try:
            frame = wire.decode_frame(payload, self._keys.get, 64 * 1024)
            if frame.sender != device or frame.kind != "eval":
                raise RejectedUpdateError(
                    "FHAI-R003", f"{frame.kind} frame from {frame.sender!r} on {device!r}'s eval topic"
                )
            header = parse_header(frame, EvalHeader)
            if header.task != self.task.task:
                raise RejectedUpdateError("FHAI-R005", f"evaluation is for task {header.task!r}")
            # Only the current global model is evaluated, and only by the open round's cohort.
            if self.device_model is None or header.model_version != self.device_model.version():
                raise RejectedUpdateError(
                    "FHAI-R015", f"evaluation of model {header.model_version}, not the current one"
                )
            if self.state is None or device not in self.state.cohort or header.round != self.model_round:
                raise RejectedUpdateError(
                    "FHAI-R016", f"device {device} was not asked to evaluate round {header.round}"
                )
            if len(header.pos_hist) != HISTOGRAM_BINS or len(header.neg_hist) != HISTOGRAM_BINS:
                raise RejectedUpdateError("FHAI-R014", f"score histograms must have {HISTOGRAM_BINS} bins")
            if min(header.pos_hist + header.neg_hist) < 0:
                raise RejectedUpdateError("FHAI-R014", "score histograms hold negative counts")
        except (RejectedUpdateError, wire.WireError) as exc:
            log.warning("rejected evaluation from %s: %s", device, exc)
            self.store.reject(self.task.task, None, device, exc.code, exc.message)
            return False
        evaluation = Evaluation(
            task_id=self.task.task,
            round=header.round,
            model_version=header.model_version,
            device_id=device,
            metrics=json.dumps(header.metrics),
            pos_hist=np.asarray(header.pos_hist, "<i8").tobytes(),
            neg_hist=np.asarray(header.neg_hist, "<i8").tobytes(),
        )
        return self.store.record_evaluation(evaluation)

    def handle_status(self, topic: str, payload: bytes) -> None:
        device = topic.split("/")[-2]
        try:
            online = json.loads(payload or b"{}").get("state") == "online"
        except (ValueError, AttributeError):
            online = False
        if online:
            self.online.add(device)
        else:
            self.online.discard(device)

    # closing rounds ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance on time: open the next round, or close the open one on quorum and deadline."""
        if self.done:
            return
        if self.state is None or self.state.row.status == "committed":
            nxt = self._next_phase()
            if nxt is None:
                self._open_final_eval()
                return
            if self._cohort_ready():
                self._open(*nxt)
            return
        row = self.state.row
        if row.phase == "eval":
            if self.clock() >= row.deadline or self._final_evals_in():
                self.store.update_round(self.task.task, row.round, status="committed", closed_at=self.clock())
                self.store.set_task_status(self.task.task, "done")
                log.info("task %s done", self.task.task)
            return
        everyone = set(self.state.cohort) <= self.state.accepted
        past_deadline = self.clock() >= row.deadline
        if everyone or (past_deadline and len(self.state.accepted) >= self.task.min_updates):
            self._close()
        elif past_deadline:
            self._extend_or_fail()

    def _cohort_ready(self) -> bool:
        """Enough devices online to open a round: a full cohort, or the quorum after cohort_wait_s."""
        n = len(self._eligible())
        if n >= self.task.cohort_size:
            return True
        if n < self.task.min_updates:
            self._quorum_since = None
            return False
        if self._quorum_since is None:
            self._quorum_since = self.clock()
        return self.clock() - self._quorum_since >= self.task.cohort_wait_s

    def _extend_or_fail(self) -> None:
        assert self.state is not None
        row = self.state.row
        if row.extensions >= self.task.deadline_extensions:
            self.store.update_round(self.task.task, row.round, status="failed", closed_at=self.clock())
            self.store.set_task_status(self.task.task, "failed")
            log.error(
                "round %d failed: %d of %d required updates by the deadline, after %d extensions",
                row.round,
                len(self.state.accepted),
                self.task.min_updates,
                row.extensions,
            )
            return
        # Widen the cohort to whoever is online now, keep what was accepted, and give everyone more time.
        cohort = sorted(set(self.state.cohort) | set(self._eligible()))
        deadline = self.clock() + self.task.round_deadline_s
        self.store.update_round(
            self.task.task, row.round, deadline=deadline, extensions=row.extensions + 1, cohort=json.dumps(cohort)
        )
        row.deadline, row.extensions, row.cohort = deadline, row.extensions + 1, json.dumps(cohort)
        self.state.cohort = cohort
        log.warning("round %d missed its quorum: deadline extended (%d)", row.round, row.extensions)
        self._announce()

    def _close(self) -> None:
        assert self.state is not None
        row = self.state.row
        self.store.update_round(self.task.task, row.round, status="aggregating")
        if row.phase == "stats":
            stats = self.state.stats
            assert stats.n_features is not None and stats.total is not None and stats.total_sq is not None
            standardizer = Standardizer.from_moments(stats.n, stats.total, stats.total_sq)
            new = Model.create(self.task.model_spec(stats.n_features), self.task.seed, standardizer)
            self.columns, self.units = list(stats.columns or []), list(stats.units or [])
        else:
            assert self.model is not None and self.state.accumulator is not None
            params = self.strategy.aggregate(self.model.params, self.state.accumulator)
            new = Model(self.model.spec, params.astype(np.float32), self.model.standardizer)
        self.store.commit_round(
            self.task.task,
            row.round,
            new.version(),
            json.dumps(new.spec.to_dict()),
            model_body(new),
            encode_state(self.strategy.state_dict()),
            closed_at=self.clock(),
            meta=json.dumps({"columns": self.columns, "units": self.units}),
        )
        row.status = "committed"
        if self.state.accumulator is not None:
            self.state.accumulator.close()
        self.model, self.model_round = new, row.round
        shipped = self.downlink.advance(new, row.round)
        log.info(
            "round %d committed: model %s from %d contributions", row.round, new.version(), len(self.state.accepted)
        )
        if row.phase == "train" and self.task.export.formats:
            for round_no, model, reason in self._exports_due(row.round, shipped):
                try:
                    self._publish_artifacts(model, round_no, reason, len(self.state.accepted))
                except Exception:  # an export problem must not stop the training; the model is committed
                    log.exception(
                        "round %d: exporting the model failed; training goes on, and "
                        "`fhai-coordinator export` can retry from the checkpoint",
                        round_no,
                    )
        apply_retention(self.store, self.task.task, row.round, self.task.retention, self.spill_dir.parent / "exports")

    def _exports_due(self, round_no: int, shipped: Model) -> list[tuple[int, Model, str]]:
        """The task's export policy after committing `round_no`: (round, devices' model, reason) to export."""
        export = self.task.export
        due: dict[int, tuple[Model, str]] = {}
        previous = self.downlink.previous
        if export.on_improvement and previous is not None:
            # The devices evaluated the previous round's model during this round.
            rows = metric_rows(self.store.evaluations(self.task.task))
            if improved({r.round: r.auroc for r in rows if r.site == POOLED}, round_no - 1):
                due[round_no - 1] = (previous, "improved")
        if export.every and round_no % export.every == 0:
            due[round_no] = (shipped, "every")
        if export.at_end and round_no == self.task.rounds:
            due[round_no] = (shipped, "end")
        return [(r, m, reason) for r, (m, reason) in sorted(due.items())]

    def _publish_artifacts(self, model: Model, round_no: int, reason: str, n_updates: int) -> None:
        """Export the devices' model of `round_no` and publish each format, retained (see artifact_delivery)."""
        card_fields = {
            "name": self.task.task,
            "feature_spec_hash": self.spec_hash,
            "columns": self.columns,
            "units": self.units,
            "metrics": {"updates": float(n_updates)},
        }
        outs = artifact_frames(
            model,
            self.task.export.formats,
            task=self.task.task,
            round_no=round_no,
            reason=reason,
            card_fields=card_fields,
        )
        folder = self.spill_dir.parent / "exports" / f"round-{round_no}"
        for out in outs:
            topic = (wire.artifact_full_topic if out.full else wire.artifact_topic)(self.task.task, out.fmt)
            frame = wire.encode_frame("artifact", wire.COORDINATOR, out.header, out.body, self.key)
            self.publish(topic, frame, True)
            if not out.full:
                save_model_files(out.artifact.data, out.artifact.card, out.artifact.suffix, folder / self.task.task)
        log.info("round %d (%s): published %s exports", round_no, reason, ", ".join(sorted({o.fmt for o in outs})))

    def _open_final_eval(self) -> None:
        assert self.model is not None
        self._open(self.model_round + 1, "eval")

    def _final_evals_in(self) -> bool:
        assert self.device_model is not None and self.state is not None
        version = self.device_model.version()
        reported = self.store.evaluated_devices(self.task.task, version)
        return set(self.state.cohort) <= reported
