"""`fhai-edge doctor`: is this device ready to join rounds? One line per check, non-zero exit on a failure.

Checks: the FHIR source (reachable, FHIR R4, credentials accepted), the clock (against the FHIR server's
Date header: round deadlines and SMART assertions are absolute times), the broker (TCP, TLS with the pinned
CA and the certificate's expiry, an MQTT v5 answer), the state folder (private, writable, free disk), the
enrollment, and Numba's kernel cache (writable, warm).

The broker check never logs in as the device: its account is pinned to the device's client id, and a second
connection with that id would end the running agent's session. Credentials are proven by `fhai-edge enroll`,
which connects once as the device.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_runtime.errors import EdgeError
from edge_runtime.mqtt import BrokerSettings

Status = Literal["ok", "warn", "fail"]
MAX_SKEW_OK_S = 5.0  # below: fine; above MAX_SKEW_FAIL_S a round's deadline means something else here
MAX_SKEW_FAIL_S = 30.0
MIN_FREE_MB = 200.0  # the FHIR mirror and the model files need room; below this a sync can fail half-way
LOW_FREE_MB = 1024.0
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():4}  {self.name:<10} {self.detail}"


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """A check that raises is a failed check with the error's one line, not a traceback."""
    try:
        return fn()
    except (EdgeError, OSError, ValueError) as exc:
        return Check(name, "fail", str(exc))
    except Exception as exc:  # the adapters' own errors (FhirAdapterError) carry a code and a hint
        return Check(name, "fail", f"{type(exc).__name__}: {exc}")


# FHIR and clock ----------------------------------------------------------------------------------
def check_fhir(
    url: str, token_file: Path | None = None, ca_bundle: Path | None = None, timeout_s: float = 10.0
) -> tuple[Check, Check]:
    """(fhir, clock): the server's version and whether it accepts our credentials; our clock against its Date."""
    from fhir_adapters.auth import BearerAuth
    from fhir_adapters.client import FhirClient, RetryPolicy, check_fhir_version
    from fhir_adapters.errors import FhirAdapterError

    auth = BearerAuth(token_file.read_text().strip()) if token_file else None
    client = FhirClient(
        url, auth=auth, timeout=timeout_s, verify=str(ca_bundle) if ca_bundle else True, retry=RetryPolicy(1)
    )
    try:
        sent = time.time()
        try:
            response = client.send("GET", "metadata")
        except FhirAdapterError as exc:
            unchecked = Check("clock", "warn", "not checked: no answer from the FHIR server")
            return Check("fhir", "fail", str(exc)), unchecked
        received = time.time()
        clock = _clock_check(response.headers.get("Date"), sent, received, url)
        try:
            cs = response.json()
            version = check_fhir_version(cs)
            client.get_json("Patient", {"_count": "1", "_summary": "count"})  # credentials and search rights
        except (FhirAdapterError, ValueError) as exc:
            return Check("fhir", "fail", str(exc)), clock
        software = cs.get("software") or {}
        name = f"{software.get('name', 'unknown server')} {software.get('version', '')}".strip()
        return Check("fhir", "ok", f"FHIR {version} at {url} ({name}), search allowed"), clock
    finally:
        client.close()


def _clock_check(date_header: str | None, sent: float, received: float, where: str) -> Check:
    if not date_header:
        return Check("clock", "warn", f"{where} sends no Date header: cannot compare clocks")
    server = email.utils.parsedate_to_datetime(date_header).timestamp()
    # The header has 1 s resolution and was stamped somewhere within the round trip.
    ours = (sent + received) / 2
    skew = ours - server
    slack = 1.0 + (received - sent) / 2
    size = max(0.0, abs(skew) - slack)
    text = f"{skew:+.1f}s against the FHIR server's Date header (+-{slack:.1f}s)"
    if size > MAX_SKEW_FAIL_S:
        return Check("clock", "fail", f"{text}: set the clock (NTP); round deadlines are absolute times")
    if size > MAX_SKEW_OK_S:
        return Check("clock", "warn", f"{text}: check NTP")
    return Check("clock", "ok", text)


def check_folder_source(folder: Path) -> Check:
    if not folder.is_dir():
        return Check("fhir", "fail", f"{folder} is neither an http(s) FHIR base URL nor a folder")
    files = [p for pattern in ("*.ndjson", "*.ndjson.gz", "*.json") for p in folder.glob(pattern)]
    if not files:
        return Check("fhir", "fail", f"{folder} holds no .ndjson or Bundle .json files")
    return Check("fhir", "ok", f"file source {folder} ({len(files)} files)")


# broker ------------------------------------------------------------------------------------------
def check_broker(settings: BrokerSettings, timeout_s: float = 10.0) -> Check:
    """TCP, then TLS (verified against the pinned CA, with the certificate's expiry), then an MQTT v5
    CONNECT with a throwaway client id and no credentials: any CONNACK proves a broker answers."""
    where = f"{settings.host}:{settings.port}"
    try:
        sock = socket.create_connection((settings.host, settings.port), timeout=timeout_s)
    except OSError as exc:
        return Check("broker", "fail", f"cannot reach {where}: {exc}")
    sock.close()
    tls = ""
    status: Status = "ok"
    if settings.ca_file:
        context = ssl.create_default_context(cafile=settings.ca_file)
        try:
            with (
                socket.create_connection((settings.host, settings.port), timeout=timeout_s) as raw,
                context.wrap_socket(raw, server_hostname=settings.host) as conn,
            ):
                cert = conn.getpeercert()
                version = conn.version()
        except (ssl.SSLError, OSError) as exc:
            return Check("broker", "fail", f"TLS to {where} with CA {settings.ca_file} failed: {exc}")
        days = (ssl.cert_time_to_seconds(str(cert["notAfter"])) - time.time()) / 86400 if cert else float("nan")
        tls = f", {version}, certificate valid {days:.0f} more days"
        if days < CERT_WARN_DAYS:
            status = "warn"
            tls += " (renew: fhai-coordinator renew-cert)"
    answer = _mqtt_probe(settings, timeout_s)
    if answer is None:
        return Check("broker", "fail", f"{where} accepts connections{tls} but no MQTT v5 CONNACK came back")
    return Check("broker", status, f"MQTT v5 broker at {where}{tls or ' (no TLS)'}; anonymous login: {answer}")


def _mqtt_probe(settings: BrokerSettings, timeout_s: float) -> str | None:
    import paho.mqtt.client as mqtt

    answered = threading.Event()
    reason: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        reason.append(str(rc))
        answered.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"fhai-doctor-{os.urandom(4).hex()}", protocol=mqtt.MQTTv5
    )
    client.on_connect = on_connect
    if settings.ca_file:
        client.tls_set(ca_certs=settings.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    try:
        client.connect(settings.host, settings.port, keepalive=10, clean_start=True)
    except (OSError, ssl.SSLError):
        return None
    client.loop_start()
    try:
        answered.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return reason[0] if reason else None


# this device -------------------------------------------------------------------------------------
def check_state(state_dir: Path) -> tuple[Check, Check]:
    """(state, disk): the state folder is private and writable; enough free space for the mirror and models."""
    if not state_dir.exists():
        state = Check("state", "warn", f"{state_dir} does not exist yet (fhai-edge init or enroll creates it)")
        probe = next((p for p in state_dir.parents if p.exists()), Path("/"))
    else:
        mode = state_dir.stat().st_mode & 0o777
        writable = os.access(state_dir, os.W_OK)
        if not writable:
            state = Check("state", "fail", f"{state_dir} is not writable by this user")
        elif mode & 0o077:
            state = Check("state", "warn", f"{state_dir} is mode {mode:o}: chmod 700 it (keys, credentials)")
        else:
            state = Check("state", "ok", f"{state_dir} is private ({mode:o}) and writable")
        probe = state_dir
    free_mb = shutil.disk_usage(probe).free / 2**20
    text = f"{free_mb:,.0f} MB free on the state folder's file system"
    if free_mb < MIN_FREE_MB:
        return state, Check("disk", "fail", f"{text}: needs at least {MIN_FREE_MB:.0f} MB")
    if free_mb < LOW_FREE_MB:
        return state, Check("disk", "warn", f"{text}: low")
    return state, Check("disk", "ok", text)


def check_enrollment(state_dir: Path) -> Check:
    from edge_runtime.enroll import load_credentials

    enrolled = load_credentials(state_dir)
    if enrolled is None:
        return Check("enrolled", "warn", f"no credentials in {state_dir}: `fhai-edge enroll`, or pass the flags")
    b = enrolled.broker
    return Check(
        "enrolled",
        "ok",
        f"as {enrolled.device_id} (site {enrolled.site}) on {b.host}:{b.port}, "
        f"coordinator key {enrolled.coordinator_key[:16]}...",
    )


def check_numba_cache(warm: bool = False) -> Check:
    """Where Numba keeps the compiled kernels, whether it can write there, and whether they are compiled.

    A cold cache costs the first round a compile (about 10 s here); `warm` compiles now.
    """
    from edge_runtime import kernels, trainer

    if warm:
        trainer.warm_up()
    cache = kernels.train_epochs._cache  # type: ignore[attr-defined]  # Numba's FunctionCache of the dispatcher
    folder = Path(cache._cache_path)
    index = Path(cache._cache_file._index_path)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK):
        return Check("numba", "fail", f"cache folder {folder} is not writable: set NUMBA_CACHE_DIR to a folder that is")
    try:
        compiled = bool(cache._cache_file._load_index())  # empty when missing or stale (the source changed)
    except Exception:  # the index format is Numba's own; fall back to the file's presence
        compiled = index.exists()
    if not compiled:
        return Check("numba", "warn", f"cache {folder} is cold: the first round compiles; `fhai-edge doctor --warm`")
    return Check("numba", "ok", f"kernels compiled in {folder}")


def run_checks(
    source: str | None,
    state_dir: Path,
    broker: BrokerSettings | None,
    token_file: Path | None = None,
    fhir_ca: Path | None = None,
    warm: bool = False,
    timeout_s: float = 10.0,
) -> list[Check]:
    checks: list[Check] = []
    if source is None:
        checks.append(Check("fhir", "warn", "no --source given: FHIR and clock not checked"))
    elif source.startswith(("http://", "https://")):
        try:
            checks.extend(check_fhir(source, token_file, fhir_ca, timeout_s))
        except (EdgeError, OSError) as exc:
            checks.append(Check("fhir", "fail", str(exc)))
    else:
        checks.append(_guard("fhir", lambda: check_folder_source(Path(source))))
    if broker is None:
        checks.append(Check("broker", "warn", "not enrolled and no --broker given: broker not checked"))
    else:
        checks.append(_guard("broker", lambda: check_broker(broker, timeout_s)))
    try:
        checks.extend(check_state(state_dir))
    except OSError as exc:
        checks.append(Check("state", "fail", str(exc)))
    checks.append(_guard("enrolled", lambda: check_enrollment(state_dir)))
    checks.append(_guard("numba", lambda: check_numba_cache(warm)))
    return checks
