"""The round state machine driven directly (no broker): a fake clock, frames signed by real keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.demo import TASK_FILE
from coordinator.rounds import RoundManager
from coordinator.store import Store
from coordinator.task import TaskDefinition, load_task
from edge_runtime import codec, wire
from edge_runtime.keys import public_hex
from edge_runtime.messages import Announcement, parse_header, stats_body
from edge_runtime.metrics import HISTOGRAM_BINS

DEVICES = ("dev-a", "dev-b", "dev-c")
COLUMNS = ["age", "sex_male", "glucose"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A store, device keys, and a RoundManager that can be 'restarted' on the same store."""

    def __init__(self, tmp: Path, store_url: str | None = None, **overrides: object) -> None:
        data = load_task(TASK_FILE).model_dump()
        data.update(task="rig", rounds=2, cohort_size=3, min_updates=2, round_deadline_s=10, cohort_wait_s=0)
        data["export"] = {"formats": []}
        data.update(overrides)
        self.task = TaskDefinition.model_validate(data)
        self.tmp = tmp
        self.store = Store(store_url or f"sqlite:///{tmp / 'db.sqlite'}")
        self.keys = {d: Ed25519PrivateKey.generate() for d in DEVICES}
        for d, k in self.keys.items():
            self.store.add_device(d, public_hex(k))
        self.coordinator_key = Ed25519PrivateKey.generate()
        self.clock = Clock()
        self.published: list[tuple[str, bytes]] = []
        self.manager = self.restart()

    def restart(self) -> RoundManager:
        m = RoundManager(
            self.store,
            self.task,
            self.coordinator_key,
            lambda topic, payload, _retain: self.published.append((topic, payload)),
            self.tmp / "spill",
            clock=self.clock,
        )
        for d in DEVICES:
            m.handle_status(wire.status_topic(d), b'{"state": "online"}')
        m.start()
        self.manager = m
        return m

    def announcements(self) -> list[Announcement]:
        out = []
        for topic, payload in self.published:
            if topic == wire.announce_topic(self.task.task):
                frame = wire.decode_frame(payload, lambda _s: self.coordinator_key.public_key())
                out.append(parse_header(frame, Announcement))
        return out

    def stats(self, device: str, columns: list[str] = COLUMNS, round_no: int = 0) -> bool:
        X = np.random.default_rng(len(device)).normal(size=(20, len(columns)))
        header = {
            "task": "rig",
            "round": round_no,
            "n": 20,
            "n_features": len(columns),
            "columns": columns,
            "units": [None] * len(columns),
        }
        frame = wire.encode_frame("stats", device, header, stats_body(X.sum(0), (X**2).sum(0)), self.keys[device])
        return self.manager.handle_update(wire.update_topic("rig", device), frame)

    def update(self, device: str) -> bool:
        m = self.manager
        assert m.model is not None and m.state is not None
        delta = np.random.default_rng(hash(device) % 100).normal(0, 0.01, m.model.params.size).astype(np.float32)
        header = {
            "task": "rig",
            "round": m.state.row.round,
            "model_version": m.state.row.model_version,  # the model the devices hold, as announced
            "n_samples": 20,
            "train_loss": 0.5,
        }
        body = codec.encode(delta, 8, np.random.default_rng(0))
        return m.handle_update(
            wire.update_topic("rig", device), wire.encode_frame("update", device, header, body, self.keys[device])
        )

    def evaluation(self, device: str, model_version: str, round_no: int) -> bool:
        header = {
            "task": "rig",
            "round": round_no,
            "model_version": model_version,
            "metrics": {"n": 5.0, "accuracy": 0.8},
            "pos_hist": [0] * HISTOGRAM_BINS,
            "neg_hist": [0] * HISTOGRAM_BINS,
        }
        frame = wire.encode_frame("eval", device, header, b"", self.keys[device])
        return self.manager.handle_eval(wire.eval_topic("rig", device), frame)


def test_a_restart_in_the_stats_round_keeps_the_sites_columns(tmp_path: Path, store_url: str) -> None:
    rig = Rig(tmp_path, store_url)
    rig.manager.tick()  # opens round 0
    assert rig.stats("dev-a") and rig.stats("dev-b")
    rig.restart()  # the coordinator died after two of three stats
    assert not rig.stats("dev-c", columns=["age", "sex_male", "bmi"])  # still checked against the first two
    assert rig.store.rejections("rig")[-1].code == "FHAI-R011"
    assert rig.stats("dev-c")
    rig.manager.tick()
    cp = rig.store.latest_checkpoint("rig")
    assert cp is not None and cp.round == 0
    assert json.loads(cp.meta)["columns"] == COLUMNS
    # Standardization is the pooled moments of all three sites' rows.
    rows = np.vstack([np.random.default_rng(len(d)).normal(size=(20, 3)) for d in DEVICES])
    assert rig.manager.model is not None
    np.testing.assert_allclose(rig.manager.model.standardizer.mean, rows.mean(0), rtol=1e-5)


def test_the_final_evaluation_is_announced_once_as_final_even_after_a_restart(tmp_path: Path, store_url: str) -> None:
    rig = Rig(tmp_path, store_url, rounds=1)
    rig.manager.tick()
    for d in DEVICES:
        rig.stats(d)
    rig.manager.tick()  # commits round 0
    rig.manager.tick()  # opens round 1
    for d in DEVICES:
        assert rig.update(d)
    rig.manager.tick()  # commits round 1
    rig.manager.tick()  # opens the eval round
    evals = [a for a in rig.announcements() if a.phase == "eval"]
    assert len(evals) == 1 and evals[0].final
    rig.published.clear()
    rig.restart()
    assert [a.final for a in rig.announcements() if a.phase == "eval"] == [True]
    model = rig.manager.device_model  # devices evaluate the copy they hold
    assert model is not None
    for d in DEVICES:
        assert rig.evaluation(d, model.version(), 1)
    rig.manager.tick()
    assert rig.store.get_task("rig").status == "done"  # type: ignore[union-attr]


def test_evaluations_must_be_of_the_current_model_by_the_cohort(tmp_path: Path) -> None:
    rig = Rig(tmp_path, cohort_size=2, min_updates=2)
    rig.manager.tick()
    cohort = rig.manager.state.cohort  # type: ignore[union-attr]
    outsider = next(d for d in DEVICES if d not in cohort)
    for d in cohort:
        rig.stats(d)
    rig.manager.tick()
    rig.manager.tick()  # round 1 open, model from round 0
    model = rig.manager.device_model
    assert model is not None
    assert rig.evaluation(cohort[0], model.version(), 0)
    assert not rig.evaluation(cohort[0], model.version(), 0)  # a second report on the same model
    assert not rig.evaluation(cohort[1], "0" * 16, 0)
    assert not rig.evaluation(outsider, model.version(), 0)
    codes = [r.code for r in rig.store.rejections("rig")]
    assert codes[-2:] == ["FHAI-R015", "FHAI-R016"]


def test_a_missed_quorum_extends_the_deadline_then_fails_the_task(tmp_path: Path) -> None:
    rig = Rig(tmp_path, deadline_extensions=1)
    rig.manager.tick()
    rig.stats("dev-a")  # one of the two required
    rig.clock.now += 11
    rig.manager.tick()
    row = rig.store.current_round("rig")
    assert row is not None and row.extensions == 1 and row.status == "collecting"
    assert [a.deadline for a in rig.announcements()] == [1010.0, rig.clock.now + 10]
    rig.clock.now += 11
    rig.manager.tick()
    assert rig.store.get_task("rig").status == "failed"  # type: ignore[union-attr]


def test_the_cohort_draw_does_not_depend_on_restarts(tmp_path: Path) -> None:
    a = Rig(tmp_path / "a", cohort_size=2)
    a.manager.tick()
    b = Rig(tmp_path / "b", cohort_size=2)
    b.restart()
    b.manager.tick()
    assert a.manager.state is not None and b.manager.state is not None
    assert a.manager.state.cohort == b.manager.state.cohort


@pytest.mark.parametrize("phase_round", [0])
def test_updates_in_the_stats_round_are_refused(tmp_path: Path, phase_round: int) -> None:
    rig = Rig(tmp_path)
    rig.manager.tick()
    header = {"task": "rig", "round": phase_round, "model_version": "none", "n_samples": 5, "train_loss": 0.1}
    body = codec.encode(np.zeros(4, np.float32), 8, np.random.default_rng(0))
    frame = wire.encode_frame("update", "dev-a", header, body, rig.keys["dev-a"])
    assert not rig.manager.handle_update(wire.update_topic("rig", "dev-a"), frame)
    assert rig.store.rejections("rig")[-1].code == "FHAI-R008"


def test_export_command_rebuilds_a_rounds_artifacts_from_the_store(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app
    from edge_runtime.inference import load_predictor

    rig = Rig(tmp_path)
    rig.manager.tick()
    for d in DEVICES:
        rig.stats(d)
    rig.manager.tick()  # round 0 committed: the initial model with the pooled standardization
    model = rig.manager.model
    assert model is not None
    args = ["export", "rig", "--out", str(tmp_path / "out"), "--format", "onnx", "--round", "0"]
    result = CliRunner().invoke(app, [*args, "--store", f"sqlite:///{tmp_path / 'db.sqlite'}"])
    assert result.exit_code == 0, result.output
    predictor = load_predictor(tmp_path / "out" / "rig.onnx")
    assert predictor.card.columns == COLUMNS and predictor.card.model_version == model.version()
    X = np.random.default_rng(1).normal(size=(7, 3))
    np.testing.assert_allclose(predictor.predict_proba(X), model.predict_proba(X), atol=1e-5)
    bad = CliRunner().invoke(app, [*args[:-2], "--round", "9", "--store", f"sqlite:///{tmp_path / 'db.sqlite'}"])
    assert bad.exit_code != 0 and "no committed round 9" in bad.output
