"""Store faults: a PostgreSQL outage is waited out, a longer one and other faults are one coded line, never a trace."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.errors import CoordinatorError
from coordinator.store import Store
from tests.proxy import TcpProxy
from tests.test_rounds import DEVICES, Rig

runner = CliRunner()


@pytest.fixture()
def proxied_postgres(postgres_url: str) -> Iterator[tuple[str, TcpProxy]]:
    """The test database reached through a proxy the test can cut (the machine's server keeps running)."""
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    proxy.close()


def _outage(proxy: TcpProxy, seconds: float) -> threading.Thread:
    proxy.cut()
    timer = threading.Timer(seconds, proxy.restore)
    timer.start()
    return timer


def test_a_postgres_outage_mid_round_is_waited_out(
    tmp_path: Path, proxied_postgres: tuple[str, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    url, proxy = proxied_postgres
    rig = Rig(tmp_path, url)
    rig.manager.tick()
    for d in DEVICES:
        assert rig.stats(d)
    rig.manager.tick()  # round 0 committed
    rig.manager.tick()  # round 1 open
    assert rig.update("dev-a")
    caplog.set_level(logging.INFO, logger="fhai.store")
    started = time.monotonic()
    _outage(proxy, 2.0).join(0)
    assert rig.update("dev-b")  # waits for the database, then is stored and folded
    assert time.monotonic() - started >= 1.5
    assert rig.store.retried_calls > 0
    assert rig.update("dev-c")
    rig.manager.tick()
    assert rig.store.current_round("rig").status == "committed"  # type: ignore[union-attr]
    assert {u.device_id for u in rig.store.accepted("rig", 1)} == set(DEVICES)
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in m for m in messages) and any("reachable again" in m for m in messages)


def test_an_outage_longer_than_the_retry_window_is_one_coded_error(proxied_postgres: tuple[str, TcpProxy]) -> None:
    url, proxy = proxied_postgres
    store = Store(url, retry_s=1.0)
    store.add_device("dev-a", "00" * 32)
    proxy.cut()
    started = time.monotonic()
    with pytest.raises(CoordinatorError) as err:
        store.device_keys()
    assert 1.0 <= time.monotonic() - started < 10
    assert err.value.code == "FHAI-S710"
    assert "start the database server" in err.value.message and "\n" not in err.value.message
    proxy.restore()
    assert store.device_keys() == {"dev-a": "00" * 32}  # and the store works again afterwards


def test_status_during_an_outage_is_one_line_and_points_at_a_log_file_that_exists(
    tmp_path: Path, proxied_postgres: tuple[str, TcpProxy]
) -> None:
    url, proxy = proxied_postgres
    Store(url).add_task("t1", "{}")
    proxy.cut()
    work = tmp_path / "coordinator"
    result = runner.invoke(app, ["status", "t1", "--store", url, "--work-dir", str(work)])
    assert result.exit_code == 2, result.output
    assert "FHAI-S710" in result.output and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    # One error line; before it, at most the one-line notices that the store is being waited for.
    assert [line for line in lines if "FHAI-S710" in line] == lines[-1:], result.output
    assert all("WARNING fhai.store" in line and "retrying" in line for line in lines[:-1]), result.output
    log_file = work / "coordinator.log"
    assert log_file.exists() and "Traceback" in log_file.read_text()  # the detail went there


def test_a_read_only_sqlite_store_is_one_coded_line(tmp_path: Path) -> None:
    db = tmp_path / "fhai.db"
    Store(f"sqlite:///{db}").add_device("dev-a", "00" * 32)
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    key = "11" * 32
    result = runner.invoke(app, ["devices", "add", "dev-b", "--public-key", key, "--store", read_only])
    assert result.exit_code == 2, result.output
    assert "FHAI-S711" in result.output and "write access" in result.output
    assert "Traceback" not in result.output


def test_the_real_cli_prints_one_line_on_a_store_fault(tmp_path: Path) -> None:
    """As a user runs it (no test logging around it): one coded line on stderr, no traceback anywhere."""
    db = tmp_path / "fhai.db"
    Store(f"sqlite:///{db}")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "devices",
            "add",
            "dev-b",
            "--public-key",
            "11" * 32,
            "--store",
            f"sqlite:///file:{db}?mode=ro&uri=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "FHAI-S711" in lines[0], done.stdout + done.stderr
