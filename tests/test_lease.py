"""One coordinator per task: the store's lease refuses a second one, the task's key is pinned, `recover` reopens."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from coordinator.broker import LocalBroker
from coordinator.cli import app
from coordinator.errors import CoordinatorError
from coordinator.lease import TaskLease, claim_task, key_fingerprint
from coordinator.service import CoordinatorService
from coordinator.store import Store
from edge_runtime.keys import load_or_create_signing_key
from edge_runtime.mqtt import BrokerSettings
from tests.conftest import POSTGRES_ADMIN_URL
from tests.harness import wait_for
from tests.test_rounds import DEVICES, Rig

runner = CliRunner()


def test_a_second_lease_on_a_task_is_refused_until_the_first_is_released(tmp_path: Path, store_url: str) -> None:
    store, other = Store(store_url), Store(store_url)
    key = Ed25519PrivateKey.generate()
    first = claim_task(store, "t1", key, tmp_path / "a")
    with pytest.raises(CoordinatorError) as err:
        claim_task(other, "t1", key, tmp_path / "b")
    assert err.value.code == "FHAI-S701"
    assert str((tmp_path / "a").resolve()) in err.value.message  # says whom to stop
    with claim_task(other, "t2", key, tmp_path / "b"):  # another task on the same store is free
        pass
    first.release()
    with claim_task(other, "t1", key, tmp_path / "b"):
        pass


def test_the_lease_dies_with_its_holder(tmp_path: Path, store_url: str) -> None:
    """A SIGKILLed coordinator leaves no stale lease: the OS (flock) or PostgreSQL (session) drops it."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey\n"
        "from coordinator.lease import TaskLease\n"
        "from coordinator.store import Store\n"
        f"lease = TaskLease(Store({store_url!r}), 't1', Path({str(tmp_path)!r})).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CoordinatorError) as err:
            TaskLease(Store(store_url), "t1", tmp_path).acquire()
        assert err.value.code == "FHAI-S701" and f"pid {holder.pid}" in err.value.message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    wait_for(lambda: _free(store_url, tmp_path), 10, "the dead holder's lease to go")


def _free(store_url: str, work: Path) -> bool:
    try:
        TaskLease(Store(store_url), "t1", work).acquire().release()
    except CoordinatorError:
        return False
    return True


def test_a_work_dir_with_another_key_is_refused(tmp_path: Path, store_url: str) -> None:
    store = Store(store_url)
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    claim_task(store, "t1", first, tmp_path / "first").release()
    with pytest.raises(CoordinatorError) as err:
        claim_task(store, "t1", second, tmp_path / "second")
    assert err.value.code == "FHAI-S702"
    assert key_fingerprint(first) in err.value.message and key_fingerprint(second) in err.value.message
    assert f"--work-dir {(tmp_path / 'first').resolve()}" in err.value.message
    # The refusal let the lease go; the right key still runs the task.
    claim_task(store, "t1", first, tmp_path / "first").release()


def test_a_lease_lost_with_its_postgres_connection_is_taken_again_or_reported(
    tmp_path: Path, postgres_url: str
) -> None:
    store = Store(postgres_url)
    key = Ed25519PrivateKey.generate()
    lease = claim_task(store, "t1", key, tmp_path)
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    database = postgres_url.rsplit("/", 1)[1]

    def cut() -> None:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks JOIN pg_stat_activity USING (pid) "
                    "WHERE locktype = 'advisory' AND datname = :db"
                ),
                {"db": database},
            )

    cut()  # the server restarts its side of the lease connection: the lock went with it
    lease.check()  # takes it again
    with pytest.raises(CoordinatorError) as err:
        claim_task(Store(postgres_url), "t1", key, tmp_path)
    assert err.value.code == "FHAI-S701"
    cut()
    thief = claim_task(Store(postgres_url), "t1", key, tmp_path / "thief")
    with pytest.raises(CoordinatorError) as err:
        lease.check()
    assert err.value.code == "FHAI-S703"
    thief.release()
    lease.release()
    admin.dispose()


def test_a_second_coordinator_is_refused_before_it_touches_the_broker(tmp_path: Path, broker: LocalBroker) -> None:
    rig = Rig(tmp_path)
    work = tmp_path / "coordinator"
    key = load_or_create_signing_key(work / "coordinator.key")
    first = CoordinatorService(rig.store, rig.task, key, BrokerSettings("127.0.0.1", broker.port), work)
    stop = threading.Event()
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(first.run(stop)), daemon=True)
    thread.start()
    try:
        wait_for(lambda: first.conn is not None and first.conn.connected.is_set(), 20, "the first coordinator")
        task_file = tmp_path / "task.yaml"
        task_file.write_text(json.dumps(rig.task.model_dump(mode="json")))
        args = ["run", str(task_file), "--store", f"sqlite:///{tmp_path / 'db.sqlite'}", "--work-dir", str(work)]
        args += ["--broker", f"127.0.0.1:{broker.port}"]
        second = runner.invoke(app, args)
        assert second.exit_code == 2, second.output
        assert "FHAI-S701" in second.output and "Traceback" not in second.output
        assert broker.log_file.read_text().count("as fhai-coordinator-rig") == 1  # its session was not stolen
        assert first.conn is not None and first.conn.connected.is_set()
        other = runner.invoke(app, [*args[:4], "--work-dir", str(tmp_path / "elsewhere"), *args[6:]])
        assert other.exit_code == 2 and "FHAI-S701" in other.output
    finally:
        stop.set()
        thread.join(20)
    assert result == ["running"]
    # Now free, but not for another key: the new work dir made a new key.
    refused = runner.invoke(app, [*args[:4], "--work-dir", str(tmp_path / "elsewhere"), *args[6:]])
    assert refused.exit_code == 2 and "FHAI-S702" in refused.output and str(work.resolve()) in refused.output


def test_recover_reopens_a_failed_task_from_its_last_committed_round(tmp_path: Path, store_url: str) -> None:
    rig = Rig(tmp_path, store_url, deadline_extensions=0)
    work = tmp_path / "coordinator"
    rig.coordinator_key = load_or_create_signing_key(work / "coordinator.key")
    rig.restart()
    rig.manager.tick()
    for d in DEVICES:
        rig.stats(d)
    rig.manager.tick()  # round 0 committed
    rig.manager.tick()  # round 1 open
    assert rig.update("dev-a")  # one of the two required ...
    rig.clock.now += 11
    rig.manager.tick()  # ... by the deadline: the task fails
    assert rig.store.get_task("rig").status == "failed"  # type: ignore[union-attr]

    result = runner.invoke(app, ["recover", "rig", "--store", store_url, "--work-dir", str(work)])
    assert result.exit_code == 0, result.output
    assert "round 0" in result.output and "[1]" in result.output
    assert rig.store.get_task("rig").status == "running"  # type: ignore[union-attr]
    row = rig.store.current_round("rig")
    assert row is not None and row.round == 1 and row.status == "collecting" and row.extensions == 0

    rig.clock.now = row.deadline - 5
    rig.restart()  # the coordinator started again: it resumes round 1 with the update it had accepted
    assert rig.manager.state is not None and rig.manager.state.accepted == {"dev-a"}
    assert rig.update("dev-b") and rig.update("dev-c")
    rig.manager.tick()
    assert rig.store.current_round("rig").status == "committed"  # type: ignore[union-attr]
    assert {u.device_id for u in rig.store.accepted("rig", 1)} == set(DEVICES)

    wrong = runner.invoke(app, ["recover", "rig", "--store", store_url, "--work-dir", str(tmp_path / "other")])
    assert wrong.exit_code == 2 and "FHAI-K001" in wrong.output  # no key there: recover never makes one
