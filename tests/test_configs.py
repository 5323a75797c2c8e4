"""Every shipped device profile and task definition loads, means what it says, and can be overridden."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coordinator.broker import broker_template
from coordinator.task import load_task
from edge_runtime import configs
from edge_runtime.errors import ConfigError
from edge_runtime.profile import load_profile
from edge_runtime.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An operator's config folder, searched first; the user's and /etc's folders point at empty places."""
    monkeypatch.setenv("FHAI_CONFIG_DIR", str(tmp_path / "etc-fhai"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(configs, "SYSTEM_DIR", tmp_path / "system")
    return tmp_path / "etc-fhai"


@pytest.mark.parametrize("path", sorted((REPO / "firmware_configs" / "devices").glob("*.yaml")), ids=lambda p: p.stem)
def test_device_profiles_load(path: Path) -> None:
    profile = load_profile(path.stem)
    assert profile.profile == path.stem
    TrainConfig(**profile.train)


@pytest.mark.parametrize("path", sorted((REPO / "firmware_configs" / "tasks").glob("*.yaml")), ids=lambda p: p.stem)
def test_task_files_load(path: Path) -> None:
    task = load_task(path)
    assert task.spec().spec_hash()
    assert load_task(path.stem) == task  # by name, from the package


def test_every_config_file_of_the_repository_is_package_data() -> None:
    """What the repository's firmware_configs/ holds is what importlib.resources finds (and so the wheel ships)."""
    for kind, suffix in (("devices", ".yaml"), ("tasks", ".yaml"), ("broker", ".conf"), ("systemd", ".service")):
        on_disk = sorted(p.name for p in (REPO / "firmware_configs" / kind).glob(f"*{suffix}"))
        assert on_disk, kind
        assert sorted(c.file.name for c in configs.available(kind, suffix).values()) == on_disk


def test_a_config_folder_overrides_the_shipped_profile_and_adds_its_own(config_dir: Path) -> None:
    shipped = load_profile("gateway")
    (config_dir / "devices").mkdir(parents=True)
    data = yaml.safe_load(configs.shipped("devices", "gateway.yaml").read_text())
    (config_dir / "devices" / "gateway.yaml").write_text(yaml.safe_dump({**data, "memory_budget_mb": 96}))
    (config_dir / "devices" / "ward-7.yaml").write_text(yaml.safe_dump({**data, "profile": "ward-7"}))
    assert shipped.memory_budget_mb != 96
    assert load_profile("gateway").memory_budget_mb == 96
    assert load_profile("ward-7").profile == "ward-7"
    assert load_profile("bedside").profile == "bedside"  # not overridden: still the package's
    found = configs.available("devices", ".yaml")
    assert found["gateway"].origin == str(config_dir / "devices" / "gateway.yaml")
    assert found["bedside"].origin.startswith("package ")


def test_search_order_is_fhai_config_dir_then_xdg_then_etc(config_dir: Path, tmp_path: Path) -> None:
    for folder, budget in ((tmp_path / "system", 32), (tmp_path / "xdg" / "fhai", 48)):
        (folder / "devices").mkdir(parents=True)
        (folder / "devices" / "bedside.yaml").write_text(f"profile: bedside\nmemory_budget_mb: {budget}\n")
    assert load_profile("bedside").memory_budget_mb == 48  # XDG before /etc
    (config_dir / "devices").mkdir(parents=True)
    (config_dir / "devices" / "bedside.yaml").write_text("profile: bedside\nmemory_budget_mb: 16\n")
    assert load_profile("bedside").memory_budget_mb == 16  # FHAI_CONFIG_DIR before both


def test_tasks_and_broker_templates_are_overridable_too(config_dir: Path) -> None:
    (config_dir / "tasks").mkdir(parents=True)
    data = yaml.safe_load(configs.shipped("tasks", "synthetic_diabetes.yaml").read_text())
    (config_dir / "tasks" / "ward_task.yaml").write_text(yaml.safe_dump({**data, "task": "ward_task", "rounds": 3}))
    assert load_task("ward_task").rounds == 3
    (config_dir / "broker").mkdir(parents=True)
    (config_dir / "broker" / "mosquitto-dev.conf").write_text("# site template {port}\n")
    assert broker_template("mosquitto-dev") == "# site template {port}\n"


def test_an_unknown_name_lists_what_exists(config_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"FHAI-P401.*known: bedside, gateway") as err:
        load_profile("toaster")
    assert str(config_dir / "devices") in str(err.value)
