"""A gateway installed from the wheel, as a hospital's IT team would: `pip install 'fhai[edge]'` into a fresh
virtual environment, then the installed `fhai-edge` takes part in a federated round against a real Mosquitto
and a coordinator from the development tree. No TensorFlow on the gateway."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coordinator.broker import LocalBroker
from edge_runtime.keys import public_hex
from tests.checkout import build_wheel, install
from tests.harness import Federation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_wheel_installs_a_working_gateway(tmp_path: Path, broker: LocalBroker, three_sites: dict[str, Path]) -> None:
    gateway = install(build_wheel(tmp_path), tmp_path / "venv")
    packages = gateway.distributions()
    assert "fhai" in packages and "numba" in packages and "paho-mqtt" in packages
    assert not {"tensorflow", "tensorflow-cpu", "keras", "sqlalchemy", "matplotlib"} & set(packages)
    probe = gateway.run("python", "-c", "import importlib.util as u; print(u.find_spec('tensorflow'))")
    assert probe.stdout.strip() == "None"

    helped = gateway.run("fhai-edge", "run", "--help")
    assert helped.returncode == 0 and "--task" in helped.stdout and "--source" in helped.stdout
    state = tmp_path / "gateway-state"
    init = gateway.run("fhai-edge", "init", "--state-dir", str(state))
    assert init.returncode == 0, init.stderr
    key = init.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    unit = gateway.run("fhai-edge", "units")  # the unit ships as package data, with this install's paths
    assert unit.returncode == 0 and f"ExecStart={gateway.bin}/fhai-edge run" in unit.stdout
    # As an operator would after installing: compile the kernels once, before the first round has a deadline.
    doctor = gateway.run("fhai-edge", "doctor", "--warm", "--state-dir", str(state), timeout=900)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert re.search(r"^OK +numba +kernels compiled in .*/site-packages/edge_runtime/__pycache__", doctor.stdout, re.M)

    # One training round with the installed runtime; the coordinator runs from the development tree.
    site, folder = next(iter(three_sites.items()))
    fed = Federation(
        tmp_path / "fed", broker, {site: folder}, "installed", rounds=1, min_updates=1, round_deadline_s=300
    )
    fed.store.add_device(site, key, site)  # the key `fhai-edge init` made in the installed environment
    try:
        fed.start_coordinator_thread(timeout_s=600)
        run = gateway.run(
            "fhai-edge", "run", "--task", fed.task.task, "--device-id", site, "--source", str(folder),
            "--coordinator-key", public_hex(fed.key), "--state-dir", str(state),
            "--broker", f"127.0.0.1:{broker.port}",
            timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        fed.wait_done(timeout=120)
    finally:
        fed.stop()
    assert fed.store.accepted_devices(fed.task.task, 1) == {site}
    assert fed.store.rejections(fed.task.task) == []
    # The default profile came from the installed package (the bug this test is for).
    assert "FHAI-P" not in run.stderr
    status = gateway.run("fhai-edge", "status", "--state-dir", str(state))
    assert status.returncode == 0 and fed.task.task in status.stderr
