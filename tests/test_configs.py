"""Every shipped device profile and task definition loads, and means what it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.task import load_task
from edge_runtime.profile import PROFILE_DIR, load_profile
from edge_runtime.trainer import TrainConfig

TASK_DIR = Path(__file__).resolve().parents[1] / "firmware_configs" / "tasks"


@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_device_profiles_load(path: Path) -> None:
    profile = load_profile(path.stem)
    assert profile.profile == path.stem
    TrainConfig(**profile.train)


@pytest.mark.parametrize("path", sorted(TASK_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_task_files_load(path: Path) -> None:
    task = load_task(path)
    assert task.spec().spec_hash()
