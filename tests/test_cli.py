"""The CLIs answer bad configs and flags with one clear line (and a code), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from coordinator.demo import TASK_FILE
from edge_runtime.cli import app as edge_app
from edge_runtime.keys import load_or_create_signing_key, public_hex

runner = CliRunner()


def _task_with(tmp_path: Path, **changes: object) -> Path:
    data = yaml.safe_load(TASK_FILE.read_text())
    data.update(changes)
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"min_updates": 9, "cohort_size": 3}, "min_updates (9) cannot exceed cohort_size (3)"),
        ({"strategy": {"name": "fedmagic"}}, "fedmagic"),
        ({"train": {"learning_rate": -1}}, "learning_rate"),
        ({"rounds": 0}, "rounds"),
        ({"task": "bad/topic"}, "device id"),
    ],
)
def test_bad_task_files_fail_in_one_line(tmp_path: Path, changes: dict[str, object], needle: str) -> None:
    result = runner.invoke(
        coordinator_app,
        [
            "run",
            str(_task_with(tmp_path, **changes)),
            "--store",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
            "--work-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_a_task_file_that_is_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("task: [unclosed")
    result = runner.invoke(coordinator_app, ["run", str(path), "--work-dir", str(tmp_path)])
    assert result.exit_code == 2 and "FHAI-J003" in result.output


def test_edge_run_refuses_unknown_profiles_and_sources(tmp_path: Path) -> None:
    key = public_hex(load_or_create_signing_key(tmp_path / "c.key"))
    base = ["run", "--task", "t", "--device-id", "dev-1", "--coordinator-key", key, "--state-dir", str(tmp_path)]
    result = runner.invoke(edge_app, [*base, "--source", str(tmp_path), "--profile", "toaster"])
    assert result.exit_code == 2 and "FHAI-P401" in result.output and "gateway" in result.output
    result = runner.invoke(edge_app, [*base, "--source", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "FHAI-D001" in result.output
    result = runner.invoke(edge_app, [*base, "--source", str(tmp_path), "--broker", "no-port"])
    assert result.exit_code == 2 and "HOST:PORT" in result.output
    result = runner.invoke(edge_app, [*base[:4], "bad/id", *base[5:], "--source", str(tmp_path)])
    assert result.exit_code == 2 and "FHAI-W013" in result.output


def test_edge_run_reports_an_unreachable_broker(tmp_path: Path) -> None:
    key = public_hex(load_or_create_signing_key(tmp_path / "c.key"))
    result = runner.invoke(
        edge_app,
        ["run", "--task", "t", "--device-id", "dev-1", "--coordinator-key", key, "--state-dir", str(tmp_path),
         "--source", str(tmp_path), "--broker", "127.0.0.1:9"],
    )  # fmt: skip
    assert result.exit_code == 2 and "FHAI-B001" in result.output


def test_demo_refuses_an_unsupported_width() -> None:
    result = runner.invoke(coordinator_app, ["demo", "--bits", "5"])
    assert result.exit_code != 0 and "4, 8 or 32" in result.output


def test_devices_add_rejects_a_bad_key(tmp_path: Path) -> None:
    result = runner.invoke(
        coordinator_app, ["devices", "add", "dev-1", "--public-key", "abcd", "--store", f"sqlite:///{tmp_path / 'db'}"]
    )
    assert result.exit_code == 2 and "FHAI-K003" in result.output


def test_edge_run_without_enrollment_asks_for_it_or_the_flags(tmp_path: Path) -> None:
    result = runner.invoke(edge_app, ["run", "--task", "t", "--source", str(tmp_path), "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "enroll the device first" in result.output and "--device-id and --coordinator-key" in result.output
