"""Broker security on a real Mosquitto 2.0 with TLS and the dynamic-security plugin: who may connect, what
each account may touch, enrollment with one-time tokens, sealed replies, revocation, forged updates.

Each test gets its own broker folder (`fhai-coordinator init`) and broker on a free port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner

from coordinator import dynsec
from coordinator.broker import free_port, start_mosquitto, stop_mosquitto
from coordinator.cli import app as coordinator_app
from coordinator.demo import TASK_FILE
from coordinator.dynsec import DynsecAdmin
from coordinator.enrollment import EnrollmentService, create_tokens, hash_token
from coordinator.security import BrokerDir, init_broker_dir, make_ca
from coordinator.service import CoordinatorService
from coordinator.store import Store
from coordinator.task import TaskDefinition, load_task
from edge_runtime import codec, wire
from edge_runtime import enroll as proto
from edge_runtime.enroll import Enrollment, EnrollmentError, enroll, load_credentials
from edge_runtime.keys import load_or_create_signing_key, load_signing_key, public_hex
from edge_runtime.mqtt import BrokerError, BrokerSettings, connect
from tests.harness import wait_for

pytestmark = pytest.mark.timeout(120)

NOT_AUTHORIZED = 135


@dataclass
class Secure:
    """A broker folder, its running broker, a coordinator store and key, and (once started) the enrollment service."""

    root: Path
    layout: BrokerDir
    process: subprocess.Popen[bytes]
    store: Store
    key: Ed25519PrivateKey
    admin: DynsecAdmin
    service: EnrollmentService | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.layout.tls_port

    def start_enrollment(self) -> EnrollmentService:
        settings = self.layout.settings("admin")
        self.service = EnrollmentService(
            self.store, self.key, self.admin, settings, bootstrap_user=self.layout.username("bootstrap")
        )
        ready = threading.Event()
        t = threading.Thread(target=self.service.run, args=(self.stop, ready), daemon=True, name="enroll-service")
        t.start()
        self.threads.append(t)
        assert ready.wait(15)
        return self.service

    def tokens(self, n: int = 1, site: str = "hospital-a", ttl_s: float = 3600) -> list[str]:
        tokens = create_tokens(self.store, site, n, ttl_s)
        if self.service is not None:
            self.service.sync_bootstrap()  # open the bootstrap window now rather than at the next tick
        return tokens

    def enroll(self, token: str, name: str, **kwargs: Any) -> Enrollment:
        return enroll(token, self.layout.settings("bootstrap"), self.root / name, timeout_s=15, **kwargs)


@pytest.fixture()
def secure(tmp_path: Path) -> Iterator[Secure]:
    port = free_port()
    layout = init_broker_dir(tmp_path / "broker", tls_port=port, bind="127.0.0.1")
    process = start_mosquitto(layout.config_file, port, log_file=layout.log_file)
    admin = DynsecAdmin(layout.settings("admin"))
    s = Secure(
        tmp_path,
        layout,
        process,
        Store(f"sqlite:///{tmp_path / 'fhai.db'}"),
        load_or_create_signing_key(tmp_path / "coordinator.key"),
        admin,
    )
    yield s
    s.stop.set()
    for t in s.threads:
        t.join(timeout=10)
    admin.close()
    stop_mosquitto(s.process)


class Probe:
    """A bare paho MQTT v5 client that records the broker's reason codes (no retries, no helpers)."""

    def __init__(
        self, port: int, ca: Path | None, username: str | None, password: str | None, client_id: str, clean: bool = True
    ) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.connack: threading.Event = threading.Event()
        self.gone = threading.Event()
        self.reason: Any = None
        self.disconnect_reason: Any = None
        self.acks: dict[int, Any] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: self._ack(mid, codes[0])
        self.client.on_publish = lambda _c, _u, mid, code, _p: self._ack(mid, code)
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 3600  # a session that outlives the connection
        self.client.connect("127.0.0.1", port, keepalive=30, clean_start=clean, properties=props)
        self.client.loop_start()
        assert self.connack.wait(10), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = reason
        self.connack.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.disconnect_reason = reason
        self.gone.set()

    def _ack(self, mid: int, code: Any) -> None:
        with self._cond:
            self.acks[mid] = code
            self._cond.notify_all()

    def _wait(self, mid: int) -> int:
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.acks, 10), f"no ack for mid {mid}"
            return int(self.acks[mid].value)

    @property
    def ok(self) -> bool:
        return not self.reason.is_failure

    def subscribe(self, topic: str) -> int:
        """The SUBACK reason code (0-2: granted QoS, 135: not authorized)."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        return self._wait(mid)

    def publish(self, topic: str, payload: bytes = b"x") -> int:
        """The PUBACK reason code (0: success, 135: not authorized)."""
        return self._wait(self.client.publish(topic, payload, qos=1).mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def probe(s: Secure, username: str | None, password: str | None, client_id: str, **kw: Any) -> Probe:
    return Probe(s.port, s.layout.ca_file, username, password, client_id, **kw)


def bootstrap_probe(s: Secure, client_id: str = "fhai-enroll-probe", **kw: Any) -> Probe:
    return probe(s, s.layout.username("bootstrap"), s.layout.settings("bootstrap").password, client_id, **kw)


def device_probe(s: Secure, e: Enrollment, **kw: Any) -> Probe:
    return probe(s, e.broker.username, e.broker.password, proto.device_client_id(e.device_id), **kw)


# no broker needed --------------------------------------------------------------------------------
def test_password_hash_matches_mosquitto_ctrl(tmp_path: Path) -> None:
    """Our dynsec hashes are what Mosquitto's own tool writes for the same password and salt."""
    out = tmp_path / "ctrl.json"
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(out), "someone", "correct horse"], check=True, capture_output=True
    )
    client = json.loads(out.read_text())["clients"][0]
    ours = dynsec.hash_password("correct horse", base64.b64decode(client["salt"]), client["iterations"])
    assert ours["password"] == client["password"]
    assert dynsec.hash_password("correct horsf", base64.b64decode(client["salt"]))["password"] != client["password"]


def test_device_role_names_exactly_its_own_topics() -> None:
    acls = {(a["acltype"], a["topic"]) for a in dynsec.device_acls("site-a")}
    assert acls == {
        ("publishClientSend", "fhai/v1/tasks/+/updates/site-a"),
        ("publishClientSend", "fhai/v1/tasks/+/eval/site-a"),
        ("publishClientSend", "fhai/v1/devices/site-a/status"),
        ("subscribePattern", "fhai/v1/tasks/+/round"),
        ("publishClientReceive", "fhai/v1/tasks/+/round"),
        ("subscribePattern", "fhai/v1/tasks/+/model"),
        ("publishClientReceive", "fhai/v1/tasks/+/model"),
        ("subscribePattern", "fhai/v1/tasks/+/artifacts/+"),
        ("publishClientReceive", "fhai/v1/tasks/+/artifacts/+"),
        # The catch-up topics a device reads while it is behind (decisions 0013, 0014).
        ("subscribePattern", "fhai/v1/tasks/+/model/key"),
        ("publishClientReceive", "fhai/v1/tasks/+/model/key"),
        ("subscribePattern", "fhai/v1/tasks/+/model/chain"),
        ("publishClientReceive", "fhai/v1/tasks/+/model/chain"),
        ("subscribePattern", "fhai/v1/tasks/+/artifacts/+/full"),
        ("publishClientReceive", "fhai/v1/tasks/+/artifacts/+/full"),
    }
    with pytest.raises(wire.WireError):
        dynsec.device_acls("site/#")


def test_sealed_credentials_open_only_with_the_device_key() -> None:
    device, other = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    blob = proto.seal(b"secret", device.public_key(), b"request-digest")
    assert proto.open_sealed(blob, device, b"request-digest") == b"secret"
    assert b"secret" not in blob
    with pytest.raises(EnrollmentError, match="FHAI-N008"):
        proto.open_sealed(blob, other, b"request-digest")
    with pytest.raises(EnrollmentError, match="FHAI-N008"):
        proto.open_sealed(blob, device, b"another request")  # bound to the request it answers
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(EnrollmentError, match="FHAI-N008"):
        proto.open_sealed(tampered, device, b"request-digest")


def test_request_and_reply_signatures() -> None:
    signing, coordinator, impostor = (Ed25519PrivateKey.generate() for _ in range(3))
    box = X25519PrivateKey.generate()
    box_hex = box.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    req = proto.EnrollRequest("ab" * 16, "tok", public_hex(signing), box_hex, {"profile": "gateway"})
    data = proto.encode_request(req, signing)
    assert proto.decode_request(data) == req
    # A request whose signing key was swapped after signing: no proof of possession.
    forged = proto.EnrollRequest("ab" * 16, "tok", public_hex(impostor), box_hex)
    with pytest.raises(EnrollmentError):
        proto.encode_request(forged, signing)
    _raw, sig, body = proto._unpack(data)
    body["signing_key"] = public_hex(impostor)
    swapped = msgpack.packb({"v": 1, "body": msgpack.packb(body), "sig": sig})
    with pytest.raises(EnrollmentError, match="FHAI-N007"):
        proto.decode_request(swapped)

    creds = proto.Credentials("site-a-1", "site-a", "site-a-1", "pw", "fhai-edge-site-a-1")
    reply = proto.encode_reply_ok(data, req, creds, coordinator)
    got, key_hex = proto.decode_reply(reply, data, box, coordinator.public_key())
    assert got == creds and key_hex == public_hex(coordinator)
    with pytest.raises(EnrollmentError, match="FHAI-N010"):  # not from the coordinator we trust
        proto.decode_reply(proto.encode_reply_ok(data, req, creds, impostor), data, box, coordinator.public_key())
    with pytest.raises(EnrollmentError, match="FHAI-N009"):  # an answer to another request
        proto.decode_reply(reply, data + b"x", box, coordinator.public_key())
    refused = proto.encode_reply_refused(data, "FHAI-N031", "used", coordinator)
    with pytest.raises(proto.EnrollmentRefusedError, match="FHAI-N031"):
        proto.decode_reply(refused, data, box, None)


# the broker folder -------------------------------------------------------------------------------
def test_init_keeps_secrets_private_and_issues_a_verifiable_certificate(secure: Secure) -> None:
    layout = secure.layout
    assert stat.S_IMODE(layout.secrets.stat().st_mode) == 0o700
    for name in ("ca.key", "server.key", "admin.password", "coordinator.password", "bootstrap.password"):
        assert stat.S_IMODE((layout.secrets / name).stat().st_mode) == 0o600, name
    # The broker rewrites the dynsec JSON on every change; it stays private (we start it with umask 077).
    secure.admin.run([{"command": "createRole", "rolename": "probe-role"}])
    assert stat.S_IMODE(layout.dynsec_file.stat().st_mode) == 0o600
    # The stored hash is of the password in the account's file (PBKDF2-SHA512, checked with hashlib).
    clients = {c["username"]: c for c in json.loads(layout.dynsec_file.read_text())["clients"]}
    admin = clients["fhai-admin"]
    password = layout.password_file("admin").read_text().strip()
    expected = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(admin["salt"]), admin["iterations"])
    assert base64.b64decode(admin["password"]) == expected
    assert clients["fhai-bootstrap"].get("disabled") is True  # closed until a token is live
    # The server certificate chains to the CA and names the loopback host.
    ca = x509.load_pem_x509_certificate(layout.ca_file.read_bytes())
    server = x509.load_pem_x509_certificate((layout.root / "server.pem").read_bytes())
    ca_pub = ca.public_key()
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
    assert server.signature_hash_algorithm is not None
    ca_pub.verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}


def test_tls_is_required_and_pinned(secure: Secure, tmp_path: Path) -> None:
    # Plain MQTT to the TLS listener: a CONNECT gets no CONNACK, only a TLS alert or a closed socket.
    connect_v5 = b"\x10\x0e\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x01x"
    with socket.create_connection(("127.0.0.1", secure.port), timeout=5) as sock:
        sock.sendall(connect_v5)
        try:
            answer = sock.recv(64)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x20"), "the TLS listener answered plain MQTT"

    def handshake(cafile: Path, name: str) -> None:
        ctx = ssl.create_default_context(cafile=str(cafile))
        with (
            socket.create_connection(("127.0.0.1", secure.port), timeout=5) as sock,
            ctx.wrap_socket(sock, server_hostname=name),
        ):
            pass

    handshake(secure.layout.ca_file, "127.0.0.1")  # our CA, a name in the certificate: fine
    handshake(secure.layout.ca_file, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(secure.layout.ca_file, "broker.elsewhere.example")  # not a name in the certificate
    _, other_ca = make_ca("someone else's CA")
    other = tmp_path / "other-ca.pem"
    other.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(other, "127.0.0.1")  # a device pinned to another CA refuses this broker


def test_renewed_certificate_serves_after_a_restart(secure: Secure) -> None:
    before = x509.load_pem_x509_certificate((secure.layout.root / "server.pem").read_bytes())
    result = CliRunner().invoke(coordinator_app, ["renew-cert", "--dir", str(secure.layout.root), "--days", "30"])
    assert result.exit_code == 0, result.output
    after = x509.load_pem_x509_certificate((secure.layout.root / "server.pem").read_bytes())
    assert after.serial_number != before.serial_number
    assert after.public_key().public_numbers() != before.public_key().public_numbers()  # type: ignore[union-attr]
    assert (after.not_valid_after_utc - after.not_valid_before_utc).days == 30
    assert stat.S_IMODE((secure.layout.secrets / "server.key").stat().st_mode) == 0o600
    stop_mosquitto(secure.process)
    secure.process = start_mosquitto(secure.layout.config_file, secure.port)
    ctx = ssl.create_default_context(cafile=str(secure.layout.ca_file))
    with (
        socket.create_connection(("127.0.0.1", secure.port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
    assert served.serial_number == after.serial_number


def test_anonymous_wrong_password_and_disabled_bootstrap_are_refused(secure: Secure) -> None:
    for username, password in ((None, None), ("fhai-coordinator", "not the password"), ("nobody", "x")):
        p = probe(secure, username, password, "fhai-probe")
        assert p.reason.is_failure, (username, p.reason)
        p.close()
    # The right coordinator password works.
    ok = probe(secure, "fhai-coordinator", secure.layout.settings("coordinator").password, "fhai-probe")
    assert ok.ok
    ok.close()
    # No live token: the bootstrap account is disabled.
    service = secure.start_enrollment()
    assert service.sync_bootstrap() is False
    p = bootstrap_probe(secure)
    assert p.reason.is_failure
    p.close()


# enrollment --------------------------------------------------------------------------------------
def test_bootstrap_account_reaches_nothing_but_enrollment(secure: Secure) -> None:
    secure.start_enrollment()
    secure.tokens(1)
    p = bootstrap_probe(secure)
    assert p.ok, p.reason
    denied_subs = [
        "#",
        "fhai/v1/tasks/+/updates/+",
        "fhai/v1/tasks/t/round",
        "fhai/v1/tasks/t/model",
        "fhai/v1/devices/+/status",
        "fhai/v1/enroll/requests/+",
        "$CONTROL/dynamic-security/v1/response",
    ]
    for topic in denied_subs:
        assert p.subscribe(topic) == NOT_AUTHORIZED, topic
    assert p.subscribe(proto.reply_topic("ab" * 16)) == 1
    denied_pubs = [
        "fhai/v1/tasks/t/updates/site-a",
        "fhai/v1/tasks/t/eval/site-a",
        "fhai/v1/devices/site-a/status",
        "fhai/v1/tasks/t/round",
        proto.reply_topic("ab" * 16),
        dynsec.CONTROL_TOPIC,
    ]
    for topic in denied_pubs:
        assert p.publish(topic) == NOT_AUTHORIZED, topic
    assert p.publish(proto.request_topic("cd" * 16), b"not a request") == 0
    p.close()


def test_enroll_stores_private_credentials_and_the_device_connects_as_itself(secure: Secure) -> None:
    secure.start_enrollment()
    (token,) = secure.tokens(1, site="hospital-a")
    e = secure.enroll(token, "dev-a", profile={"profile": "gateway"}, coordinator_key=public_hex(secure.key))
    assert e.site == "hospital-a" and e.device_id.startswith("hospital-a-")
    state = secure.root / "dev-a"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "device.key").stat().st_mode) == 0o600
    assert load_credentials(state) == e
    assert e.broker.ca_file == str((state / "ca.pem").resolve())
    # The coordinator registered the key the device signs with, and spent the token on this device.
    assert secure.store.device_keys() == {e.device_id: public_hex(load_signing_key(state / "device.key"))}
    (row,) = secure.store.tokens()
    assert row.token_hash == hash_token(token) and row.device_id == e.device_id and row.used_at is not None
    assert json.loads(row.profile or "{}") == {"profile": "gateway"}
    # Its account is pinned to its client id.
    assert device_probe(secure, e).ok
    wrong_id = probe(secure, e.broker.username, e.broker.password, "fhai-edge-someone-else")
    assert wrong_id.reason.is_failure
    wrong_id.close()


def test_used_expired_unknown_and_mismatched_tokens_are_refused(secure: Secure) -> None:
    service = secure.start_enrollment()
    (token,) = secure.tokens(1, site="hospital-a")
    secure.enroll(token, "first")
    with pytest.raises(proto.EnrollmentRefusedError, match="FHAI-N031"):
        secure.enroll(token, "second")  # used
    (expired,) = create_tokens(secure.store, "hospital-a", 1, ttl_s=60, now=time.time() - 120)
    with pytest.raises(proto.EnrollmentRefusedError, match="FHAI-N032"):
        secure.enroll(expired, "third")
    assert not (secure.root / "second" / "credentials.json").exists()

    # The decisions themselves, straight through the service (the broker only carries them).
    def code(token: str, **fields: Any) -> str | None:
        signing = Ed25519PrivateKey.generate()
        box = X25519PrivateKey.generate().public_key()
        box_hex = box.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
        req = proto.EnrollRequest(os.urandom(16).hex(), token, public_hex(signing), box_hex, **fields)
        return service.handle(proto.request_topic(req.nonce), proto.encode_request(req, signing)).code

    (live,) = secure.tokens(1, site="hospital-b")
    assert code("fhai_et_" + "A" * 43) == "FHAI-N030"  # unknown
    assert code(live, site="hospital-a") == "FHAI-N034"  # issued for another site
    assert code(live, device_id="fhai-admin") == "FHAI-N037"  # a service account's name
    assert code(live, device_id=secure.store.devices()[0].id) == "FHAI-N035"  # taken
    assert secure.store.live_tokens(time.time()) == 1  # refusals on our side do not spend the token
    assert code(live, device_id="ward-7") is None
    assert secure.admin.client_exists("ward-7")
    assert secure.admin.client_exists("fhai-admin")


def test_another_bootstrap_client_sees_the_reply_but_cannot_open_it(secure: Secure) -> None:
    secure.start_enrollment()
    (token,) = secure.tokens(1)
    eavesdropper = bootstrap_probe(secure, "fhai-enroll-eavesdropper")
    assert eavesdropper.subscribe(f"{proto.REPLIES}/+") == 1  # dynsec 2.0 cannot pin it to its own reply
    e = secure.enroll(token, "dev-a")
    wait_for(lambda: len(eavesdropper.messages) == 1, 10, "the reply to reach the eavesdropper")
    _, reply = eavesdropper.messages[0]
    assert e.broker.password is not None and e.broker.password.encode() not in reply
    _raw, _sig, body = proto._unpack(reply)
    with pytest.raises(EnrollmentError, match="FHAI-N008"):
        proto.open_sealed(body["sealed"], X25519PrivateKey.generate(), body["request"])
    eavesdropper.close()


# enrolled devices --------------------------------------------------------------------------------
def test_a_device_is_confined_to_its_own_topics(secure: Secure) -> None:
    secure.start_enrollment()
    ta, tb = secure.tokens(2)
    a = secure.enroll(ta, "dev-a", device_id="site-a")
    secure.enroll(tb, "dev-b", device_id="site-b")
    p = device_probe(secure, a)
    for topic in (
        "fhai/v1/tasks/t/updates/site-b",
        "fhai/v1/tasks/+/updates/+",
        "fhai/v1/tasks/t/eval/site-b",
        "fhai/v1/devices/site-b/status",
        "fhai/v1/tasks/t/updates/site-a",  # not even its own uplink: only the coordinator reads updates
        "fhai/v1/enroll/replies/+",
        "#",
    ):
        assert p.subscribe(topic) == NOT_AUTHORIZED, topic
    for topic in ("fhai/v1/tasks/t/round", "fhai/v1/tasks/t/model", "fhai/v1/tasks/t/artifacts/onnx"):
        assert p.subscribe(topic) == 1, topic
    for topic in ("fhai/v1/tasks/t/round", "fhai/v1/tasks/t/model", dynsec.CONTROL_TOPIC):
        assert p.publish(topic) == NOT_AUTHORIZED, topic
    p.close()
    # The runtime's own client sees a denied publish as FHAI-B005 (MQTT v5 PUBACK reason 135).
    conn = connect(proto.device_client_id(a.device_id), a.broker, [], clean_start=True)
    try:
        for topic in (
            wire.update_topic("t", "site-b"),
            wire.eval_topic("t", "site-b"),
            wire.status_topic("site-b"),
        ):
            with pytest.raises(BrokerError, match="FHAI-B005"):
                conn.publish(topic, b"forged", wait_s=10)
        conn.publish(wire.update_topic("t", "site-a"), b"mine", wait_s=10)
        conn.publish(wire.status_topic("site-a"), b"{}", wait_s=10)
    finally:
        conn.close()


def test_taking_over_a_device_session_yields_none_of_its_messages(secure: Secure) -> None:
    """Mosquitto 2.0 lets any authenticated client take a connected client's id; the default-deny receive
    ACL means the taker still gets nothing queued for or sent to that device."""
    secure.start_enrollment()
    (token,) = secure.tokens(1)
    a = secure.enroll(token, "dev-a", device_id="site-a")
    victim = device_probe(secure, a, clean=False)
    assert victim.subscribe("fhai/v1/tasks/t/round") == 1
    victim.close()  # its session (and subscription) stays at the broker
    taker = bootstrap_probe(secure, proto.device_client_id("site-a"), clean=False)  # resumes the session
    assert taker.ok
    coordinator = probe(secure, "fhai-coordinator", secure.layout.settings("coordinator").password, "fhai-coord-x")
    assert coordinator.publish("fhai/v1/tasks/t/round", b"announcement") == 0  # 0, not 16: a subscriber exists
    time.sleep(0.5)
    assert taker.messages == []
    taker.close()
    coordinator.close()


def _task(task_id: str, cohort: int) -> TaskDefinition:
    data = load_task(TASK_FILE).model_dump()
    data.update(task=task_id, rounds=1, cohort_size=cohort, min_updates=cohort, round_deadline_s=60, cohort_wait_s=0)
    return TaskDefinition.model_validate(data)


def _update_frame(sender: str, key: Ed25519PrivateKey, task: str) -> bytes:
    body = codec.encode(np.zeros(16, np.float32), 8, np.random.default_rng(0), 256, False)
    header = {"task": task, "round": 1, "model_version": "0" * 16, "n_samples": 10, "train_loss": 0.5}
    return wire.encode_frame("update", sender, header, body, key)


def test_forged_and_revoked_updates_are_rejected_and_revocation_ends_the_session(secure: Secure) -> None:
    secure.start_enrollment()
    ta, tb = secure.tokens(2)
    a = secure.enroll(ta, "dev-a", device_id="site-a")
    secure.enroll(tb, "dev-b", device_id="site-b")
    key_a = load_signing_key(secure.root / "dev-a" / "device.key")
    task = _task("sec", cohort=2)
    service = CoordinatorService(
        secure.store, task, secure.key, secure.layout.settings("coordinator"), secure.root / "coordinator"
    )
    t = threading.Thread(target=service.run, args=(secure.stop,), daemon=True, name="coordinator")
    t.start()
    secure.threads.append(t)
    wait_for(lambda: service.conn is not None and service.conn.connected.is_set(), 15, "the coordinator to connect")

    conn = connect(proto.device_client_id("site-a"), a.broker, [], clean_start=True)
    try:
        # site-a's own topic (the broker allows it) carrying a frame that claims to be site-b: signed with
        # site-a's key, so it does not verify under site-b's enrolled key.
        conn.publish(wire.update_topic("sec", "site-a"), _update_frame("site-b", key_a, "sec"), wait_s=10)
        wait_for(lambda: len(secure.store.rejections("sec")) == 1, 15, "the forged update's rejection")
        assert secure.store.rejections("sec")[0].code == "FHAI-W012"

        # Revoked in the store only (say the broker was unreachable): the coordinator drops its updates.
        secure.store.revoke_device("site-a")
        time.sleep(2.5)  # the coordinator re-reads device keys every 2 s
        conn.publish(wire.update_topic("sec", "site-a"), _update_frame("site-a", key_a, "sec"), wait_s=10)
        wait_for(lambda: len(secure.store.rejections("sec")) == 2, 15, "the revoked device's rejection")
        assert secure.store.rejections("sec")[1].code == "FHAI-W011"
    finally:
        conn.close()

    # `devices revoke` with the broker folder: the broker account goes, and with it the live session.
    live = device_probe(secure, a)
    assert live.ok and not live.gone.is_set()
    result = CliRunner().invoke(
        coordinator_app,
        ["devices", "revoke", "site-a", "--store", secure.store.engine.url.render_as_string(hide_password=False),
         "--broker-dir", str(secure.layout.root)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert live.gone.wait(10), "the revoked device kept its session"
    assert live.disconnect_reason is not None and live.disconnect_reason.is_failure
    live.close()
    again = device_probe(secure, a)
    assert again.reason.is_failure
    again.close()
    assert not secure.admin.client_exists("site-a")
    assert secure.admin.client_exists("site-b")


def test_cli_init_and_tokens(tmp_path: Path) -> None:
    runner = CliRunner()
    store = f"sqlite:///{tmp_path / 'fhai.db'}"
    folder = tmp_path / "broker"
    result = runner.invoke(
        coordinator_app,
        ["init", "--dir", str(folder), "--tls-port", "18883", "--plain-port", "18884",
         "--work-dir", str(tmp_path / "coordinator")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    conf = (folder / "mosquitto.conf").read_text()
    assert "listener 18883 0.0.0.0" in conf and "listener 18884 127.0.0.1" in conf
    assert "allow_anonymous false" in conf and "plugin_opt_config_file" in conf
    again = runner.invoke(coordinator_app, ["init", "--dir", str(folder)])
    assert again.exit_code == 2 and "FHAI-Y005" in again.output  # never overwrites a broker's secrets
    result = runner.invoke(coordinator_app, ["tokens", "create", "--site", "h-1", "--count", "3", "--ttl", "2h",
                                             "--store", store])  # fmt: skip
    assert result.exit_code == 0, result.output
    tokens = [line for line in result.stdout.splitlines() if line.startswith("fhai_et_")]
    assert len(tokens) == 3 and len(set(tokens)) == 3
    rows = Store(store).tokens()
    assert {r.token_hash for r in rows} == {hashlib.sha256(t.encode()).hexdigest() for t in tokens}
    assert all(abs(r.expires_at - r.created_at - 7200) < 5 and r.site == "h-1" for r in rows)
    assert runner.invoke(coordinator_app, ["tokens", "create", "--site", "h", "--ttl", "soon"]).exit_code == 2
    # A lost token can be expired by the hash prefix `tokens list` shows.
    listed = runner.invoke(coordinator_app, ["tokens", "list", "--store", store])
    assert listed.exit_code == 0 and rows[0].token_hash[:12] in listed.output
    result = runner.invoke(coordinator_app, ["tokens", "expire", rows[0].token_hash[:12], "--store", store])
    assert result.exit_code == 0, result.output
    assert Store(store).live_tokens(time.time()) == 2
    assert (
        runner.invoke(coordinator_app, ["tokens", "expire", rows[0].token_hash[:12], "--store", store]).exit_code == 2
    )


def test_enrolled_settings_are_used_by_edge_run_defaults(secure: Secure, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fhai-edge run` without --username takes the enrolled account (and refuses another device id)."""
    from edge_runtime import agent as agent_module
    from edge_runtime.cli import app as edge_app

    secure.start_enrollment()
    (token,) = secure.tokens(1)
    e = secure.enroll(token, "dev-a", device_id="site-a")
    seen: list[BrokerSettings] = []

    class FakeAgent:
        def __init__(self, cfg: Any) -> None:
            seen.append(cfg.broker)

        def run(self) -> None:
            pass

    monkeypatch.setattr(agent_module, "EdgeAgent", FakeAgent)
    data = secure.root / "data"
    data.mkdir()
    (data / "Patient.ndjson").write_text("")
    base = ["run", "--task", "t", "--source", str(data), "--coordinator-key", public_hex(secure.key),
            "--state-dir", str(secure.root / "dev-a")]  # fmt: skip
    result = CliRunner().invoke(edge_app, [*base, "--device-id", "site-a"])
    assert result.exit_code == 0, result.output
    assert seen == [e.broker]
    result = CliRunner().invoke(edge_app, [*base, "--device-id", "site-b"])
    assert result.exit_code != 0 and "enrolled as 'site-a'" in result.output


def test_our_client_reports_a_refused_login_at_once(secure: Secure) -> None:
    """edge_runtime.mqtt.connect stops at the first refusing CONNACK instead of retrying to its timeout."""
    wrong = replace(secure.layout.settings("coordinator"), password="not the password")
    started = time.monotonic()
    with pytest.raises(BrokerError, match="FHAI-B002") as info:
        connect("fhai-probe", wrong, [], timeout_s=30)
    assert time.monotonic() - started < 10
    assert "password" in str(info.value).lower() or "authorized" in str(info.value).lower()
