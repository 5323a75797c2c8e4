"""The repository as a user gets it: a copy of the checkout, its wheel, and a fresh virtual environment with
the wheel installed the way a hospital's IT team would (`pip install 'fhai[edge]'`). Used by the install test
and by bench/install.py; nothing here touches the working tree (pip builds in the copy)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the installed environment must not see: the developer's tree or the shared venv's packages.
CLEAN_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in CLEAN_ENV_DROP}, **extra}


def copy_checkout(dest: Path) -> Path:
    """The files git would ship (tracked, plus new files not ignored), copied to `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def build_wheel(work: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the checkout; returns the folder holding the wheel."""
    source = copy_checkout(work / "source")
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
        env=clean_env(),
    )
    return wheels


@dataclass(frozen=True)
class Install:
    venv: Path
    seconds: float

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A command of the environment (e.g. "fhai-edge", "init"), run outside the repository."""
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or self.venv,
            env=clean_env(),
        )

    def distributions(self) -> dict[str, int]:
        """Installed distributions and the bytes of their files (from each one's RECORD)."""
        probe = (
            "import importlib.metadata as m, json, os\n"
            "out = {}\n"
            "for d in m.distributions():\n"
            "    size = 0\n"
            "    for f in d.files or []:\n"
            "        p = d.locate_file(f)\n"
            "        size += os.path.getsize(p) if os.path.isfile(p) else 0\n"
            "    out[d.metadata['Name'].lower()] = size\n"
            "print(json.dumps(out))\n"
        )
        done = subprocess.run(
            [str(self.python), "-c", probe], capture_output=True, text=True, check=True, env=clean_env()
        )
        sizes: dict[str, int] = json.loads(done.stdout)
        return sizes


def install(wheels: Path, venv: Path, requirement: str = "fhai[edge]") -> Install:
    """A fresh venv (no system site-packages) with `requirement` from the wheel folder plus pip's index and
    cache, as configured on this machine: the second run installs from the cache."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
    started = time.monotonic()
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--find-links", str(wheels), requirement],
        check=True,
        capture_output=True,
        env=clean_env(),
        timeout=1800,
    )
    return Install(venv, time.monotonic() - started)
