"""Fixtures shared by the federation tests: a real Mosquitto per test and small synthetic hospitals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker import LocalBroker, free_port
from fhir_adapters.synthetic import generate_hospitals


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A fresh Mosquitto on a free loopback port, with persistence (so it can be restarted mid-test)."""
    b = LocalBroker(tmp_path / "broker", free_port()).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def site_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four small non-IID hospitals as Bulk ndjson folders, one per site."""
    root = tmp_path_factory.mktemp("hospitals")
    out = {}
    for h in generate_hospitals(4, seed=3, sizes=[260, 200, 160, 120]):
        h.write_ndjson(root / h.site_id)
        out[h.site_id] = root / h.site_id
    return out


@pytest.fixture()
def three_sites(site_folders: dict[str, Path]) -> dict[str, Path]:
    return dict(list(site_folders.items())[:3])
