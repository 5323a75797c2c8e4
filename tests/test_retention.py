"""Bounded disk: committed rounds' update bodies are dropped (hash kept), old checkpoints and exports pruned."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.errors import CoordinatorError
from coordinator.retention import prune_exports
from coordinator.store import AcceptedUpdate, Round, Store, StoredUpdate
from edge_runtime.messages import model_from_body
from tests.test_rounds import DEVICES, Rig


def _run_two_rounds(rig: Rig, restart_in_round_2: bool) -> np.ndarray:
    rig.manager.tick()
    for d in DEVICES:
        assert rig.stats(d)
    rig.manager.tick()  # round 0 committed
    for _ in (1, 2):
        rig.manager.tick()  # round opens
        round_no = rig.manager.state.row.round  # type: ignore[union-attr]
        assert rig.update("dev-a") and rig.update("dev-b")
        if round_no == 2 and restart_in_round_2:
            rig.restart()  # resumes round 2: re-folds its two stored bodies
            assert rig.manager.state is not None and rig.manager.state.accepted == {"dev-a", "dev-b"}
        assert rig.update("dev-c")
        rig.manager.tick()  # committed
    cp = rig.store.latest_checkpoint("rig")
    assert cp is not None and cp.round == 2
    return model_from_body(__import__("json").loads(cp.spec), cp.model).params


def test_committed_bodies_are_dropped_with_their_hash_kept_and_a_resumed_round_is_unchanged(
    tmp_path: Path, store_url: str
) -> None:
    pruned = Rig(tmp_path / "pruned", store_url)
    bodies: dict[tuple[int, str], bytes] = {}
    accept = pruned.store.accept

    def spy(task_id: str, round_no: int, update: StoredUpdate) -> bool:
        bodies[(round_no, update.device_id)] = update.body
        return accept(task_id, round_no, update)

    pruned.store.accept = spy  # type: ignore[method-assign]
    params = _run_two_rounds(pruned, restart_in_round_2=True)
    kept = Rig(tmp_path / "kept", retention={"update_bodies_rounds": None})
    np.testing.assert_array_equal(params, _run_two_rounds(kept, restart_in_round_2=False))

    with pruned.store.session() as s:
        rows = list(s.query(AcceptedUpdate).filter_by(task_id="rig"))
    assert {(r.round, r.device_id) for r in rows} == set(bodies)  # every contribution still on record
    for r in rows:
        assert r.body == b"" and r.pruned_at is not None
        assert r.body_sha256 == hashlib.sha256(bodies[(r.round, r.device_id)]).hexdigest()
        assert r.body_bytes == len(bodies[(r.round, r.device_id)]) and r.n_samples == 20
    assert all(len(u.body) > 0 for u in kept.store.accepted("rig", 1))


def test_retention_keeps_the_last_rounds_bodies_and_checkpoints_it_is_asked_to(tmp_path: Path) -> None:
    rig = Rig(tmp_path, retention={"update_bodies_rounds": 1, "checkpoints": 2})
    _run_two_rounds(rig, restart_in_round_2=False)
    assert [len(u.body) > 0 for u in rig.store.accepted("rig", 1)] == [False] * 3
    assert [len(u.body) > 0 for u in rig.store.accepted("rig", 2)] == [True] * 3
    assert rig.store.checkpoint("rig", 0) is None and rig.store.checkpoint("rig", 1) is not None


def test_pruned_bodies_give_their_disk_back(tmp_path: Path) -> None:
    db = tmp_path / "fhai.db"
    store = Store(f"sqlite:///{db}")
    store.open_round(Round(task_id="t", round=1, phase="train", status="collecting", model_version="v",
                           cohort="[]", deadline=0.0))  # fmt: skip
    rng = np.random.default_rng(0)
    for i in range(40):
        body = rng.integers(0, 256, 2**20, dtype=np.uint8).tobytes()  # 1 MB that does not compress
        assert store.accept("t", 1, StoredUpdate(f"dev-{i}", "update", 10, 0.1, body))
    assert store.size_bytes() > 40 * 2**20
    assert store.prune_update_bodies("t", 1) == (0, 0)  # the round is not committed: nothing goes
    store.update_round("t", 1, status="committed")
    assert store.prune_update_bodies("t", 1) == (40, 40 * 2**20)
    store.reclaim_space()
    assert store.size_bytes() < 2 * 2**20


def test_old_export_folders_are_pruned(tmp_path: Path) -> None:
    for r in (1, 2, 10, 11):
        (tmp_path / f"round-{r}").mkdir()
    (tmp_path / "notes").mkdir()
    assert sorted(p.name for p in prune_exports(tmp_path, 2)) == ["round-1", "round-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "round-10", "round-11"]


def test_a_store_made_before_the_audit_columns_gets_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        for column in ("body_sha256", "body_bytes", "pruned_at"):
            conn.execute(text(f"ALTER TABLE updates DROP COLUMN {column}"))
    engine.dispose()
    store = Store(url)
    store.open_round(Round(task_id="t", round=1, phase="train", status="committed", model_version="v",
                           cohort="[]", deadline=0.0))  # fmt: skip
    assert store.accept("t", 1, StoredUpdate("dev-a", "update", 10, 0.1, b"body"))
    assert store.prune_update_bodies("t", 1) == (1, 4)


def test_status_shows_the_stores_size(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.manager.tick()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    result = CliRunner().invoke(app, ["status", "rig", "--store", url, "--work-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("store:"))
    assert float(line.split()[1]) == pytest.approx(rig.store.size_bytes() / 2**20, abs=0.1)


def test_an_open_rounds_bodies_live_in_a_segment_file_checked_on_the_way_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.manager.tick()
    for d in DEVICES:
        assert rig.stats(d)
    rig.manager.tick()
    rig.manager.tick()  # round 1 open
    assert rig.update("dev-a") and rig.update("dev-b")
    segments = rig.store.segments
    assert segments is not None
    segment = segments.path("rig", 1)
    with rig.store.session() as s:
        rows = list(s.query(AcceptedUpdate).filter_by(task_id="rig", round=1))
    assert all(r.body == b"" and r.segment_offset is not None for r in rows)  # the database holds no body
    assert segment.stat().st_size == sum(r.body_bytes or 0 for r in rows)
    assert not segments.path("rig", 0).exists()  # round 0 committed: its segment went with its bodies
    rig.restart()  # re-folds round 1 from the segment
    assert rig.manager.state is not None and rig.manager.state.accepted == {"dev-a", "dev-b"}
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(CoordinatorError) as err:
        rig.restart()
    assert err.value.code == "FHAI-S715" and str(segment) in err.value.message
