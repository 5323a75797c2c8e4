"""Shipped configuration files and the operator's overrides of them.

The package `firmware_configs` ships device profiles (`devices/*.yaml`), task definitions (`tasks/*.yaml`),
broker configuration templates (`broker/*.conf`) and systemd units (`systemd/*`); they are read with
importlib.resources, so a `pip install 'fhai[edge]'` has them. A file with the same kind and name in a
config directory replaces the shipped one (whole files, no merging). The first match wins:

1. `$FHAI_CONFIG_DIR/<kind>/<name>` (FHAI_CONFIG_DIR may list several folders, separated by `:`)
2. `$XDG_CONFIG_HOME/fhai/<kind>/<name>` (XDG_CONFIG_HOME defaults to `~/.config`)
3. `/etc/fhai/<kind>/<name>`
4. the copy in the installed package

A command-line value with a `/` or a file suffix is a path and skips the search.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from edge_runtime.errors import ConfigError

PACKAGE = "firmware_configs"
SYSTEM_DIR = Path("/etc/fhai")


def override_dirs() -> list[Path]:
    """The config directories searched before the package's own files, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get("FHAI_CONFIG_DIR", "").split(os.pathsep) if p]
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return [*dirs, Path(xdg) / "fhai", SYSTEM_DIR]


def shipped(kind: str, name: str = "") -> Traversable:
    """A file (or, with no name, the folder) of the kind as the package ships it."""
    folder = files(PACKAGE) / kind
    return folder / name if name else folder


@dataclass(frozen=True)
class ConfigFile:
    """A config file found by name, and where it came from (for messages and `doctor`)."""

    name: str
    file: Traversable  # a pathlib.Path for an override, the package's resource otherwise
    origin: str

    def read_text(self) -> str:
        return self.file.read_text(encoding="utf-8")


def is_path(value: str | os.PathLike[str]) -> bool:
    text = os.fspath(value)
    return "/" in text or os.sep in text or bool(Path(text).suffix)


def available(kind: str, suffix: str) -> dict[str, ConfigFile]:
    """Every config of the kind by name (file stem), each as the search order resolves it."""
    found: dict[str, ConfigFile] = {}
    for folder in override_dirs():
        if (folder / kind).is_dir():
            for path in sorted((folder / kind).glob(f"*{suffix}")):
                found.setdefault(path.stem, ConfigFile(path.stem, path, str(path)))
    for entry in sorted(shipped(kind).iterdir(), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(suffix):
            stem = entry.name.removesuffix(suffix)
            found.setdefault(stem, ConfigFile(stem, entry, f"package {PACKAGE}/{kind}/{entry.name}"))
    return dict(sorted(found.items()))


def find(kind: str, name: str, suffix: str) -> ConfigFile:
    """The config NAME of the kind, by the search order; FHAI-P401 names what exists when it is missing."""
    configs = available(kind, suffix)
    if name in configs:
        return configs[name]
    places = ", ".join(str(d / kind) for d in override_dirs())
    raise ConfigError(
        "FHAI-P401",
        f"no {kind} config named {name!r} (looked in {places} and the package); "
        f"known: {', '.join(configs) or 'none'}; or give a file path",
    )


def resolve(kind: str, name_or_path: str | os.PathLike[str], suffix: str) -> ConfigFile:
    """A command-line value: a file path as it is, else a name looked up by the search order."""
    if is_path(name_or_path):
        path = Path(name_or_path)
        return ConfigFile(path.stem, path, str(path))
    return find(kind, os.fspath(name_or_path), suffix)


def render_unit(name: str, bin_dir: str | None = None) -> str:
    """A shipped (or overridden) systemd unit with {bin} filled in: where this install's fhai scripts are."""
    text = find("systemd", name, ".service").read_text()
    return text.replace("{bin}", bin_dir or sysconfig.get_path("scripts"))


def write_units(names: list[str], out: Path, bin_dir: str | None = None) -> list[Path]:
    """Write the named units into `out` (e.g. /etc/systemd/system); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = out / f"{name}.service"
        path.write_text(render_unit(name, bin_dir))
        written.append(path)
    return written
