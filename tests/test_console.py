"""A quiet, truthful console: TensorFlow says nothing, the demo leaves tracked files alone, the round status
names who is missing and never reads 'round 6/5', and a device says 'not selected' once per round."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coordinator.broker import LocalBroker
from coordinator.progress import RoundView
from tests.checkout import copy_checkout
from tests.harness import Federation

ROOT = Path(__file__).resolve().parents[1]


def view(**changes: object) -> RoundView:
    base: dict[str, object] = dict(
        task="t", rounds=5, round=3, phase="train", status="collecting", cohort=("a", "b", "c"),
        accepted=("a",), online=("a", "b"), seconds_left=42.4, model_version="m",
    )  # fmt: skip
    return RoundView(**{**base, **changes})  # type: ignore[arg-type]


def test_round_status_names_the_missing_devices_and_the_time_left() -> None:
    assert view().detail() == "round 3/5 (collecting): 1/3 answered; waiting for b, c (offline); 42s left"
    assert view(phase="stats", round=0).label == "feature statistics"
    assert view(phase="eval", round=6).label == "final evaluation"  # the round after the last: not "round 6/5"
    assert view(round=None, cohort=(), accepted=()).detail() == "waiting for devices, 2 online"
    done = view(status="committed", accepted=("a", "b", "c"))
    assert "waiting" not in done.detail() and "left" not in done.detail()


EXPORT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from edge_runtime.console import setup_logging
    from edge_runtime.model import Model, ModelSpec, Standardizer
    from coordinator.distribution import build_artifacts
    setup_logging(Path(sys.argv[1]))
    X = np.random.default_rng(0).normal(size=(50, 4))
    model = Model.create(ModelSpec(4, (3,)), 0, Standardizer.fit(X))
    out = build_artifacts(model, ["tflite", "tflite_int8"], name="q", feature_spec_hash="0" * 16,
                          columns=list("abcd"), units=[None] * 4, rounds=1)
    print(sorted(out))
    """
)


def test_tensorflow_export_writes_nothing_to_the_console(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", EXPORT, str(tmp_path / "x.log")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['tflite', 'tflite_int8']"
    assert done.stderr == ""  # no absl W0000/I0000 lines, no converter print
    # What the int8 converter printed on descriptor 2 is in the log file instead.
    assert "fully_quantize" in (tmp_path / "x.log").read_text()


def test_the_edge_cli_sets_one_blas_thread_before_numpy_loads() -> None:
    probe = "import sys, os, edge_runtime.cli; print('numpy' in sys.modules, os.environ['OPENBLAS_NUM_THREADS'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.stdout.split() == ["False", "1"], done.stderr


@pytest.mark.timeout(300)
def test_not_selected_is_said_once_per_round(
    tmp_path: Path, broker: LocalBroker, three_sites: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fhai.edge")
    fed = Federation(tmp_path / "fed", broker, three_sites, "picky", rounds=3, cohort_size=2, min_updates=2)
    fed.enroll_all()
    try:
        fed.start_devices()
        fed.start_coordinator_thread()
        fed.wait_done()
    finally:
        fed.stop()
    per_device: dict[str, list[str]] = {}
    for r in caplog.records:
        if r.getMessage().endswith(": not selected"):
            per_device.setdefault(r.threadName, []).append(r.getMessage())
    sat_out = {
        (f"agent-{site}", r.round) for r in fed.store.rounds(fed.task.task) for site in three_sites
        if site not in json.loads(r.cohort)
    }  # fmt: skip
    assert sat_out, "no device sat out a round: the case under test did not happen"
    # A round wakes a device twice (its announcement, its model): still one line per device and round.
    said = {(thread, int(m.split()[1].rstrip(":"))) for thread, ms in per_device.items() for m in ms}
    assert sum(len(ms) for ms in per_device.values()) == len(said)
    assert said <= sat_out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_leaves_a_clean_checkout(tmp_path: Path) -> None:
    """`fhai-coordinator demo` in a fresh copy of the repository: its results go to runs/, git sees no change."""
    clone = copy_checkout(tmp_path / "clone")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=clone, check=True)
    subprocess.run([*git, "add", "-A"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=clone, check=True)
    env = {**os.environ, "PYTHONPATH": str(clone)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "demo", "--rounds", "1"],
        cwd=clone, capture_output=True, text=True, timeout=840, env=env,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == "", status.stdout
    assert (clone / "runs" / "demo" / "federation.json").exists()
    assert (clone / "runs" / "demo" / "federation_rounds.png").exists()
    for noise in ("W0000", "I0000", "fully_quantize", "absl::InitializeLog"):
        assert noise not in output, noise
    # Off a terminal: the coordinator's steps as plain lines, as they happened.
    assert "round 1 (train) open" in output and "round 1/1" in output and "final evaluation" in output
