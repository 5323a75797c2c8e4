"""The deployed shape: `fhai-coordinator run --broker-dir --enroll` on a TLS broker, devices enrolled with
`fhai-edge enroll` that then join with nothing but --task and --source, systemd units that verify."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from coordinator.broker import free_port, start_mosquitto, stop_mosquitto
from coordinator.enrollment import create_tokens
from coordinator.security import init_broker_dir
from coordinator.store import Store
from coordinator.task import load_task
from edge_runtime import configs
from edge_runtime.round_log import RoundLog
from tests.harness import wait_for

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def collect_stderr(process: subprocess.Popen[str]) -> list[str]:
    """The process's stderr lines as they come (read by a thread, so the test can wait for one)."""
    lines: list[str] = []
    assert process.stderr is not None
    stream = process.stderr
    threading.Thread(target=lambda: lines.extend(iter(stream.readline, "")), daemon=True).start()
    return lines


def test_enrolled_devices_join_with_task_and_source_only(tmp_path: Path, three_sites: dict[str, Path]) -> None:
    sites = dict(list(three_sites.items())[:2])
    port = free_port()
    layout = init_broker_dir(tmp_path / "broker", tls_port=port, bind="127.0.0.1")
    broker = start_mosquitto(layout.config_file, port, log_file=layout.log_file)
    store_url = f"sqlite:///{tmp_path / 'coordinator' / 'fhai.db'}"
    data = configs.shipped("tasks", "synthetic_diabetes.yaml").read_text()
    task = {**yaml.safe_load(data), "task": "enrolled", "rounds": 1, "cohort_size": 2, "min_updates": 2}
    task.update(round_deadline_s=60, cohort_wait_s=0, export={"formats": []})
    task_file = tmp_path / "enrolled.yaml"
    task_file.write_text(yaml.safe_dump(task))
    tokens = create_tokens(Store(store_url), "hospital-a", 2, 3600)
    procs: list[subprocess.Popen[str]] = []
    try:
        coordinator = subprocess.Popen(
            cli("coordinator.cli", "run", str(task_file), "--store", store_url, "--work-dir",
                str(tmp_path / "coordinator"), "--broker-dir", str(layout.root), "--enroll"),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(coordinator)
        logged = collect_stderr(coordinator)
        wait_for(lambda: any("enrollment service on" in x for x in logged), 60, "the enrollment service")
        for site, token in zip(sites, tokens, strict=True):
            (tmp_path / f"{site}.token").write_text(token)
            enroll = subprocess.run(
                cli("edge_runtime.cli", "enroll", "--broker", f"127.0.0.1:{port}", "--ca", str(layout.ca_file),
                    "--token-file", str(tmp_path / f"{site}.token"), "--bootstrap-password-file",
                    str(layout.password_file("bootstrap")), "--state-dir", str(tmp_path / site), "--device-id", site),
                cwd=ROOT, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert enroll.returncode == 0, enroll.stderr
            assert enroll.stdout.strip() == site
        # The enrollment state is all `run` needs besides the task and the data.
        for site, folder in sites.items():
            run = cli(
                "edge_runtime.cli",
                "run",
                "--task",
                "enrolled",
                "--source",
                str(folder),
                "--state-dir",
                str(tmp_path / site),
            )
            procs.append(subprocess.Popen(run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        coordinator.wait(timeout=300)
        err = "".join(logged)
        assert coordinator.returncode == 0, err[-3000:]
        for p in procs[1:]:
            _, edge_err = p.communicate(timeout=60)
            assert p.returncode == 0, edge_err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stop_mosquitto(broker)

    db = Store(store_url)
    assert db.get_task("enrolled").status == "done"  # type: ignore[union-attr]
    assert db.accepted_devices("enrolled", 1) == set(sites)
    assert {d.id for d in db.devices()} == set(sites)
    # Off a terminal the coordinator wrote plain log lines as it went, with who was missing and the time left.
    assert "enrollment service on 127.0.0.1" in err
    assert "waiting for" in err and "s left" in err and "round 1/1" in err and "final evaluation" in err
    assert "\x1b[" not in err  # no terminal control codes in a journal
    for site in sites:
        status = subprocess.run(
            cli("edge_runtime.cli", "status", "--state-dir", str(tmp_path / site)),
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0
        rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in status.stderr.splitlines()]
        row = next(r for r in rows if r[0] == "enrolled")
        assert row[:5] == ["enrolled", "1", "0", "0", "2"]  # 1 trained, none late or missed, stats + eval


def test_a_round_sent_after_its_deadline_is_not_counted_as_trained(tmp_path: Path) -> None:
    log = RoundLog(tmp_path / "progress-t.json")
    log.record(0, "stats", "sent")
    log.record(1, "train", "sent")
    log.record(2, "train", "late")
    log.record(3, "train", "missed")
    assert log.handled() == {0, 1, 2}  # a missed round stays open to a re-announcement with a later deadline
    s = log.summary()
    assert (s.trained, s.late, s.missed, s.other, s.last_round) == (1, 1, 1, 1, 2)
    log.record(3, "train", "sent")  # extended and sent in time after all
    assert log.summary().trained == 2 and log.summary().missed == 0
    assert json.loads((tmp_path / "progress-t.json").read_text())["done"] == [0, 1, 2, 3]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """The units as `units --out` writes them pass `systemd-analyze verify` (directives, paths, executables)."""
    for module, names in (
        ("coordinator.cli", ["fhai-broker", "fhai-coordinator@"]),
        ("edge_runtime.cli", ["fhai-edge@"]),
    ):
        done = subprocess.run(
            cli(module, "units", "--out", str(tmp_path)), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        for name in names:
            text = (tmp_path / f"{name}.service").read_text()
            assert "{bin}" not in text and f"{Path(sys.executable).parent}/fhai-" in text
            for hardening in ("DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=", "NoNewPrivileges=yes"):
                assert hardening in text, (name, hardening)
    units = [
        tmp_path / "fhai-broker.service",
        tmp_path / "fhai-coordinator@demo.service",
        tmp_path / "fhai-edge@demo.service",
    ]
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "fhai" not in verify.stderr, verify.stderr  # no warning about our units at all
    # A broken unit does fail: the check is real.
    (tmp_path / "fhai-bad@.service").write_text(
        (tmp_path / "fhai-edge@.service").read_text().replace("ProtectHome=yes", "ProtectHoem=yes")
    )
    bad = tmp_path / "fhai-bad@x.service"
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(bad)], capture_output=True, text=True)
    assert "ProtectHoem" in verify.stderr


def test_units_name_commands_and_flags_that_exist() -> None:
    """Every flag a unit passes is one the CLI accepts (a renamed flag would break the service, not a test)."""
    for name, module in (("fhai-coordinator@", "coordinator.cli"), ("fhai-edge@", "edge_runtime.cli")):
        line = next(x for x in configs.render_unit(name).splitlines() if x.startswith("ExecStart="))
        words = line.split()
        command = words[1]
        help_text = subprocess.run(
            cli(module, command, "--help"), capture_output=True, text=True, timeout=120, cwd=ROOT,
            env={**os.environ, "COLUMNS": "200"},
        ).stdout  # fmt: skip
        for flag in (w for w in words if w.startswith("--")):
            assert flag in help_text, (name, flag)
    assert load_task("synthetic_diabetes").task == "synthetic_diabetes"  # %i resolves a task by name
