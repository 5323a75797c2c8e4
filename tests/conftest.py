"""Fixtures shared by the federation tests: a real Mosquitto per test and small synthetic hospitals."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

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


POSTGRES_ADMIN_URL = os.environ.get("FHAI_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (the machine's server, see docs/architecture.md), dropped afterwards."""
    name = f"fhai_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The coordinator store both ways it is deployed: embedded SQLite and PostgreSQL by URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'fhai.db'}"
    return str(request.getfixturevalue("postgres_url"))
