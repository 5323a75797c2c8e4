"""Many devices on one machine: a simulated fleet in one process against a real coordinator and Mosquitto."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.broker import LocalBroker
from coordinator.cli import app as coordinator_app
from coordinator.demo import TASK_FILE
from coordinator.service import CoordinatorService
from coordinator.store import AcceptedUpdate, Store
from coordinator.task import TaskDefinition, load_task
from edge_runtime.keys import load_or_create_signing_key, public_hex
from edge_runtime.mqtt import BrokerSettings
from edge_runtime.simulate import Fleet
from edge_runtime.site_data import SourceConfig
from tests.harness import wait_for


def _federate(tmp_path: Path, broker: LocalBroker, data: Path, n: int, cohort: int, update: str) -> tuple[Fleet, Store]:
    task_data = load_task(TASK_FILE).model_dump()
    task_data.update(
        task="fleet", rounds=1, cohort_size=cohort, min_updates=cohort, round_deadline_s=120, cohort_wait_s=0
    )
    task_data["export"] = {"formats": []}
    task = TaskDefinition.model_validate(task_data)
    work = tmp_path / "coordinator"
    key = load_or_create_signing_key(work / "coordinator.key")
    store = Store(f"sqlite:///{work / 'fhai.db'}")
    settings = BrokerSettings("127.0.0.1", broker.port)
    fleet = Fleet(n, task.task, settings, public_hex(key), SourceConfig.parse(str(data)), update=update)  # type: ignore[arg-type]
    keys = tmp_path / "keys.csv"
    keys.write_text(fleet.keys_csv())
    result = CliRunner().invoke(
        coordinator_app, ["devices", "import", str(keys), "--store", f"sqlite:///{work / 'fhai.db'}"]
    )
    assert result.exit_code == 0 and f"{n} devices added" in result.output, result.output
    service = CoordinatorService(store, task, key, settings, work)
    threading.Thread(target=service.run, daemon=True, name="coordinator").start()
    return fleet, store


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_thousand_simulated_devices_on_a_few_threads(
    tmp_path: Path, broker: LocalBroker, site_folders: dict[str, Path]
) -> None:
    n, cohort = 1000, 200
    started = time.monotonic()
    fleet, store = _federate(tmp_path, broker, next(iter(site_folders.values())), n, cohort, "noise")
    threads_before = threading.active_count()
    fleet.start()
    try:
        assert fleet.stats.connected == n
        assert threading.active_count() - threads_before <= len(fleet.loops) + 2 + 1  # loops, workers, no per-device
        assert fleet.wait_final(240), fleet.stats
        wait_for(lambda: (t := store.get_task("fleet")) is not None and t.status == "done", 60, "the task to end")
    finally:
        fleet.stop()
    rounds = store.rounds("fleet")
    assert [(r.phase, r.status) for r in rounds] == [
        ("stats", "committed"),
        ("train", "committed"),
        ("eval", "committed"),
    ]
    for r in rounds[:2]:
        members = json.loads(r.cohort)
        assert len(members) == cohort and set(members) <= {d.device_id for d in fleet.devices}
        assert store.accepted_devices("fleet", r.round) == set(members)
    assert store.rejections("fleet") == []
    assert len({e.device_id for e in store.evaluations("fleet")}) >= cohort
    broker_log = broker.log_file.read_text()
    assert broker_log.count("New client connected") >= n and "exceeded timeout" not in broker_log
    assert fleet.stats.disconnects == 0
    print(f"{n} devices, cohort {cohort}: {time.monotonic() - started:.1f}s, pid {os.getpid()}")


def test_trained_updates_from_a_small_fleet(tmp_path: Path, broker: LocalBroker, site_folders: dict[str, Path]) -> None:
    fleet, store = _federate(tmp_path, broker, next(iter(site_folders.values())), 5, 5, "train")
    fleet.start()
    try:
        assert fleet.wait_final(120), fleet.stats
        wait_for(lambda: (t := store.get_task("fleet")) is not None and t.status == "done", 60, "the task to end")
    finally:
        fleet.stop()
    assert len(store.accepted_devices("fleet", 1)) == 5
    # The devices trained on the same rows from different seeds: their updates differ (bodies are dropped
    # at the commit; their hashes stay).
    with store.session() as s:
        bodies = {u.device_id: u.body_sha256 for u in s.query(AcceptedUpdate).filter_by(task_id="fleet", round=1)}
    assert len(set(bodies.values())) == 5
