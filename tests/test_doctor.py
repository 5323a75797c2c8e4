"""`fhai-edge doctor` against a real SEKMET FHIR server and real Mosquitto brokers (plain and TLS)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker import LocalBroker, free_port, start_mosquitto, stop_mosquitto
from coordinator.security import init_broker_dir
from edge_runtime.doctor import Check, _clock_check, check_numba_cache
from tests.fixtures.sekmet import SekmetServer, start_sekmet

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sekmet() -> Iterator[SekmetServer]:
    server = start_sekmet()
    yield server
    server.stop()


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Check]]:
    """Run the real command; parse its one line per check."""
    done = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    checks = {}
    for line in done.stdout.splitlines():
        status, name, detail = line.split(None, 2)
        checks[name] = Check(name, status.lower(), detail)  # type: ignore[arg-type]
    assert checks, done.stderr
    return done.returncode, checks


def test_a_ready_device_passes_every_check(sekmet: SekmetServer, broker: LocalBroker, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(sekmet.token or "")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    rc, checks = doctor(
        "--source", sekmet.base_url, "--token-file", str(token), "--broker", f"127.0.0.1:{broker.port}",
        "--state-dir", str(state), "--warm",
    )  # fmt: skip
    assert rc == 0, checks
    assert checks["fhir"].status == "ok" and "FHIR 4.0" in checks["fhir"].detail
    assert checks["clock"].status == "ok" and "Date header" in checks["clock"].detail
    assert checks["broker"].status == "ok" and "MQTT v5 broker" in checks["broker"].detail
    assert "(no TLS)" in checks["broker"].detail
    assert checks["state"].status == "ok" and checks["disk"].status == "ok"
    assert checks["numba"].status == "ok"
    assert checks["enrolled"].status == "warn"  # flags instead of an enrollment: fine, but said
    assert list(checks) == ["fhir", "clock", "broker", "state", "disk", "enrolled", "numba"]


def test_wrong_url_wrong_token_and_no_broker_fail_with_a_reason(
    sekmet: SekmetServer, tmp_path: Path, broker: LocalBroker
) -> None:
    # The server's root is not its FHIR base: /metadata is not there.
    rc, checks = doctor("--source", sekmet.root_url + "/nothing", "--broker", f"127.0.0.1:{free_port()}")
    assert rc == 1
    assert checks["fhir"].status == "fail" and "404" in checks["fhir"].detail
    assert checks["broker"].status == "fail" and "cannot reach" in checks["broker"].detail
    # Reachable and R4, but the credentials are refused.
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    rc, checks = doctor("--source", sekmet.base_url, "--token-file", str(wrong), "--broker", f"127.0.0.1:{broker.port}")
    assert rc == 1 and checks["fhir"].status == "fail" and "FHIR-003" in checks["fhir"].detail
    assert checks["broker"].status == "ok"
    # Nobody listens at all.
    rc, checks = doctor("--source", f"http://127.0.0.1:{free_port()}/fhir")
    assert rc == 1 and "unreachable" in checks["fhir"].detail and checks["clock"].status == "warn"


def test_tls_broker_is_verified_against_the_pinned_ca(tmp_path: Path) -> None:
    port = free_port()
    layout = init_broker_dir(tmp_path / "broker", tls_port=port, bind="127.0.0.1")
    process = start_mosquitto(layout.config_file, port, log_file=layout.log_file)
    try:
        rc, checks = doctor("--broker", f"127.0.0.1:{port}", "--tls-ca", str(layout.ca_file))
        assert checks["broker"].status == "ok", checks["broker"]
        assert "TLSv1." in checks["broker"].detail and "certificate valid 7" in checks["broker"].detail
        assert "Not authorized" in checks["broker"].detail or "Bad user" in checks["broker"].detail
        # Another CA (say, a stale copy): the handshake fails, and doctor says so.
        other = init_broker_dir(tmp_path / "other", tls_port=free_port(), bind="127.0.0.1")
        rc, checks = doctor("--broker", f"127.0.0.1:{port}", "--tls-ca", str(other.ca_file))
        assert rc == 1 and checks["broker"].status == "fail" and "certificate verify failed" in checks["broker"].detail
    finally:
        stop_mosquitto(process)


def test_a_cold_numba_cache_is_a_warning_until_warmed(tmp_path: Path) -> None:
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    rc, checks = doctor("--state-dir", str(tmp_path / "state"), env=env)
    assert checks["numba"].status == "warn" and "cold" in checks["numba"].detail
    assert rc == 0  # warnings only
    rc, checks = doctor("--state-dir", str(tmp_path / "state"), "--warm", env=env)
    assert checks["numba"].status == "ok" and str(tmp_path / "cache") in checks["numba"].detail
    assert check_numba_cache().status in ("ok", "warn")  # in this process's own cache: it answers either way


def test_clock_skew_is_judged_with_the_round_trip_as_slack() -> None:
    date = "Wed, 02 Dec 2026 12:00:00 GMT"
    at = 1796212800.0  # that instant
    assert _clock_check(date, at + 0.2, at + 0.4, "x").status == "ok"
    assert _clock_check(date, at + 9.0, at + 9.2, "x").status == "warn"
    assert _clock_check(date, at - 120.0, at - 119.8, "x").status == "fail"
    assert _clock_check(None, at, at, "x").status == "warn"
