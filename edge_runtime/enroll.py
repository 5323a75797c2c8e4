"""Enrollment over MQTT: a device trades a one-time token for its own broker account.

The device has no id and no account yet, so it connects with the shared bootstrap account (TLS,
pinned CA), which may only publish to fhai/v1/enroll/requests/+ and read fhai/v1/enroll/replies/+.
It picks a random nonce and sends, on requests/{nonce}, a request signed with its Ed25519 key (proof
that it holds the key the coordinator will register) that carries the token, its X25519 public key
and its device profile. The coordinator answers on replies/{nonce} with a reply it signs, bound to
the request by the request's SHA-256, holding the new username and password sealed to the device's
X25519 key (X25519 + HKDF-SHA256 + ChaCha20-Poly1305). Other bootstrap clients may read the reply
(Mosquitto 2.0's dynsec has no per-client topic substitution), but cannot open it.

The protocol (message layout, sealing) lives here so the coordinator can import it: the edge runtime
never imports the coordinator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_runtime import wire
from edge_runtime.errors import EdgeError
from edge_runtime.keys import load_or_create_signing_key, public_from_hex, public_hex
from edge_runtime.mqtt import BrokerSettings, connect

log = logging.getLogger("fhai.enroll")

PROTOCOL = 1
REQUESTS = f"{wire.PREFIX}/enroll/requests"
REPLIES = f"{wire.PREFIX}/enroll/replies"
# Domain separation: a signature or key made for one purpose is useless for another.
REQUEST_CONTEXT = b"fhai/v1 enroll request\x00"
REPLY_CONTEXT = b"fhai/v1 enroll reply\x00"
SEAL_INFO = b"fhai/v1 enroll credentials"
MAX_MESSAGE_BYTES = 16 * 1024
CREDENTIALS_FILE = "credentials.json"
CA_FILE = "ca.pem"


class EnrollmentError(EdgeError):
    """Enrollment failed: an unreachable service, or a message that does not check out."""


class EnrollmentRefusedError(EnrollmentError):
    """The coordinator answered, and said no (the code and message are its own)."""


def device_client_id(device_id: str) -> str:
    """The MQTT client id an enrolled device must use (the broker account is pinned to it)."""
    return f"fhai-edge-{wire.check_device_id(device_id)}"


def request_topic(nonce: str) -> str:
    return f"{REQUESTS}/{nonce}"


def reply_topic(nonce: str) -> str:
    return f"{REPLIES}/{nonce}"


def check_nonce(nonce: str) -> str:
    if len(nonce) != 32 or any(c not in "0123456789abcdef" for c in nonce):
        raise EnrollmentError("FHAI-N001", f"enrollment nonce {nonce[:40]!r} is not 32 lowercase hex digits")
    return nonce


# signed envelopes --------------------------------------------------------------------------------
def _pack_signed(body: dict[str, Any], context: bytes, key: Ed25519PrivateKey) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb({"v": PROTOCOL, "body": raw, "sig": key.sign(context + raw)}, use_bin_type=True)


def _unpack(data: bytes) -> tuple[bytes, bytes, dict[str, Any]]:
    """(body bytes, signature, body) of an envelope, without checking the signature."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise EnrollmentError("FHAI-N002", f"enrollment message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(outer, dict) or outer.get("v") != PROTOCOL:
            raise ValueError(f"not a protocol-{PROTOCOL} envelope")
        raw, sig = outer["body"], outer["sig"]
        if not isinstance(raw, bytes) or not isinstance(sig, bytes):
            raise ValueError("body and sig must be bytes")
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        if not isinstance(body, dict):
            raise ValueError("body is not a map")
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise EnrollmentError("FHAI-N003", f"malformed enrollment message: {exc}") from exc
    return raw, sig, body


def _field(body: dict[str, Any], name: str, typ: type, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, typ):
        raise EnrollmentError("FHAI-N004", f"enrollment message field {name!r} is missing or not a {typ.__name__}")
    return value


def digest(message: bytes) -> bytes:
    """What a reply quotes to say which request it answers."""
    return hashlib.sha256(message).digest()


# requests ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnrollRequest:
    nonce: str
    token: str
    signing_key: str  # hex Ed25519 public key: the key the device will sign its updates with
    box_key: str  # hex X25519 public key: the credentials are sealed to it
    profile: dict[str, Any] = field(default_factory=dict)
    device_id: str | None = None  # the id the device asks for; the coordinator makes one if None
    site: str | None = None  # a check: refused if the token was issued for another site


def encode_request(req: EnrollRequest, key: Ed25519PrivateKey) -> bytes:
    if public_hex(key) != req.signing_key:
        raise EnrollmentError("FHAI-N005", "the request must be signed with the key it enrolls")
    body = {
        "nonce": req.nonce,
        "token": req.token,
        "signing_key": req.signing_key,
        "box_key": req.box_key,
        "profile": req.profile,
        "device_id": req.device_id,
        "site": req.site,
        "ts": time.time(),
    }
    return _pack_signed(body, REQUEST_CONTEXT, key)


def decode_request(data: bytes) -> EnrollRequest:
    """Parse a request and check it is signed by the signing key it carries (proof of possession)."""
    raw, sig, body = _unpack(data)
    signing_key = _field(body, "signing_key", str)
    box_key = _field(body, "box_key", str)
    try:
        X25519PublicKey.from_public_bytes(bytes.fromhex(box_key))
    except ValueError as exc:
        raise EnrollmentError("FHAI-N006", "the request's X25519 key is not 32 bytes of hex") from exc
    try:
        public_from_hex(signing_key).verify(sig, REQUEST_CONTEXT + raw)
    except (InvalidSignature, EdgeError) as exc:
        raise EnrollmentError("FHAI-N007", "the request is not signed by the key it enrolls") from exc
    device_id = _field(body, "device_id", str, optional=True)
    if device_id is not None:
        wire.check_device_id(device_id)
    return EnrollRequest(
        nonce=check_nonce(_field(body, "nonce", str)),
        token=_field(body, "token", str),
        signing_key=signing_key,
        box_key=box_key,
        profile=_field(body, "profile", dict),
        device_id=device_id,
        site=_field(body, "site", str, optional=True),
    )


# sealing -----------------------------------------------------------------------------------------
def _seal_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=SEAL_INFO).derive(shared)


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(plaintext: bytes, recipient: X25519PublicKey, aad: bytes) -> bytes:
    """ephemeral X25519 public key (32) | nonce (12) | ChaCha20-Poly1305 ciphertext; `aad` is bound in."""
    ephemeral = X25519PrivateKey.generate()
    eph_pub = _raw(ephemeral.public_key())
    key = _seal_key(ephemeral.exchange(recipient), eph_pub, _raw(recipient))
    nonce = os.urandom(12)
    return eph_pub + nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def open_sealed(blob: bytes, recipient: X25519PrivateKey, aad: bytes) -> bytes:
    if len(blob) < 32 + 12 + 16:
        raise EnrollmentError("FHAI-N008", "sealed credentials are too short")
    eph_pub, nonce, ct = blob[:32], blob[32:44], blob[44:]
    key = _seal_key(
        recipient.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, _raw(recipient.public_key())
    )
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ct, aad)
    except InvalidTag as exc:
        raise EnrollmentError("FHAI-N008", "sealed credentials do not open with this device's key") from exc


# replies -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    device_id: str
    site: str
    username: str
    password: str
    client_id: str


def encode_reply_ok(request: bytes, req: EnrollRequest, creds: Credentials, key: Ed25519PrivateKey) -> bytes:
    """The coordinator's answer to an accepted request: the credentials sealed to the device."""
    secret = msgpack.packb({"username": creds.username, "password": creds.password}, use_bin_type=True)
    recipient = X25519PublicKey.from_public_bytes(bytes.fromhex(req.box_key))
    body = {
        "request": digest(request),
        "status": "ok",
        "device_id": creds.device_id,
        "site": creds.site,
        "client_id": creds.client_id,
        "sealed": seal(secret, recipient, digest(request)),
        "coordinator_key": public_hex(key),
    }
    return _pack_signed(body, REPLY_CONTEXT, key)


def encode_reply_refused(request: bytes, code: str, message: str, key: Ed25519PrivateKey) -> bytes:
    body = {"request": digest(request), "status": "refused", "code": code, "message": message}
    body["coordinator_key"] = public_hex(key)
    return _pack_signed(body, REPLY_CONTEXT, key)


def decode_reply(
    data: bytes, request: bytes, box: X25519PrivateKey, coordinator: Ed25519PublicKey | None
) -> tuple[Credentials, str]:
    """Check a reply (signature, that it answers `request`) and open it: (credentials, coordinator key hex).

    With `coordinator` None the key in the reply is trusted: the channel is TLS to a broker whose CA the
    device pins, and only the enrollment service may publish replies. Pass the key to not rely on that.
    Raises EnrollmentError for a refusal, and for a reply that is not ours (the caller keeps waiting).
    """
    raw, sig, body = _unpack(data)
    if _field(body, "request", bytes) != digest(request):
        raise EnrollmentError("FHAI-N009", "the reply answers another request")
    key_hex = _field(body, "coordinator_key", str)
    key = coordinator or public_from_hex(key_hex)
    try:
        key.verify(sig, REPLY_CONTEXT + raw)
    except InvalidSignature as exc:
        raise EnrollmentError("FHAI-N010", "the reply is not signed by the coordinator's key: not trusted") from exc
    if coordinator is not None and public_hex(coordinator) != key_hex:
        raise EnrollmentError("FHAI-N010", "the reply names another coordinator key")
    if _field(body, "status", str) != "ok":
        code = _field(body, "code", str)
        raise EnrollmentRefusedError(code, f"enrollment refused: {_field(body, 'message', str)}")
    secret = msgpack.unpackb(open_sealed(_field(body, "sealed", bytes), box, digest(request)), raw=False)
    device_id = wire.check_device_id(_field(body, "device_id", str))
    creds = Credentials(
        device_id=device_id,
        site=_field(body, "site", str),
        username=str(secret["username"]),
        password=str(secret["password"]),
        client_id=_field(body, "client_id", str),
    )
    return creds, key_hex


# on the device -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Enrollment:
    """What an enrolled device keeps in state_dir/credentials.json (mode 0600)."""

    device_id: str
    site: str
    coordinator_key: str
    broker: BrokerSettings

    def to_json(self) -> dict[str, Any]:
        b = self.broker
        return {
            "version": 1,
            "device_id": self.device_id,
            "site": self.site,
            "coordinator_key": self.coordinator_key,
            "host": b.host,
            "port": b.port,
            "username": b.username,
            "password": b.password,
            "ca_file": b.ca_file,
        }


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)
    tmp.replace(path)


def load_credentials(state_dir: Path) -> Enrollment | None:
    """The broker account this device enrolled for (its settings ready to connect), or None if not enrolled."""
    path = state_dir / CREDENTIALS_FILE
    if not path.exists():
        return None
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by others: chmod 600 it (it holds the device's broker password)", path)
    try:
        data = json.loads(path.read_text())
        broker = BrokerSettings(
            host=data["host"],
            port=int(data["port"]),
            username=data["username"],
            password=data["password"],
            ca_file=data["ca_file"],
        )
        return Enrollment(data["device_id"], data["site"], data["coordinator_key"], broker)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnrollmentError("FHAI-N020", f"cannot read {path}: {exc}; enroll again with `fhai-edge enroll`") from exc


def enroll(
    token: str,
    bootstrap: BrokerSettings,
    state_dir: Path,
    *,
    device_id: str | None = None,
    site: str | None = None,
    profile: dict[str, Any] | None = None,
    coordinator_key: str | None = None,
    timeout_s: float = 30.0,
    verify: bool = True,
) -> Enrollment:
    """Enroll this device (its key in state_dir/device.key) and store its credentials; see the module doc.

    `bootstrap` holds the broker address, the CA file and the bootstrap account. With `verify`, the
    device then connects once as itself, so a success here means it can join rounds.
    """
    if bootstrap.ca_file is None:
        raise EnrollmentError("FHAI-N011", "enrollment needs TLS: pass the broker's CA certificate (--ca)")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)  # it holds the signing key and the broker password
    if (state_dir / CREDENTIALS_FILE).exists():
        raise EnrollmentError(
            "FHAI-N012",
            f"{state_dir} is already enrolled ({CREDENTIALS_FILE}); to enroll again, revoke the device at the "
            "coordinator and delete that file",
        )
    signing = load_or_create_signing_key(state_dir / "device.key")
    box = X25519PrivateKey.generate()  # only for this exchange: it is never stored
    nonce = secrets.token_hex(16)
    req = EnrollRequest(
        nonce=nonce,
        token=token.strip(),
        signing_key=public_hex(signing),
        box_key=_raw(box.public_key()).hex(),
        profile=profile or {},
        device_id=device_id,
        site=site,
    )
    request = encode_request(req, signing)
    trusted = public_from_hex(coordinator_key) if coordinator_key else None
    conn = connect(f"fhai-enroll-{nonce[:16]}", bootstrap, [reply_topic(nonce)], clean_start=True, timeout_s=timeout_s)
    try:
        conn.publish(request_topic(nonce), request, qos=1, expiry_s=int(timeout_s), wait_s=timeout_s)
        creds, key_hex = _await_reply(conn.inbox, request, box, trusted, timeout_s)
    finally:
        conn.close()

    # Keep a copy of the CA beside the credentials, so `run` needs nothing but the state dir.
    ca_copy = state_dir / CA_FILE
    if Path(bootstrap.ca_file).resolve() != ca_copy.resolve():
        shutil.copyfile(bootstrap.ca_file, ca_copy)
    settings = BrokerSettings(
        bootstrap.host, bootstrap.port, creds.username, creds.password, ca_file=str(ca_copy.resolve())
    )
    enrollment = Enrollment(creds.device_id, creds.site, key_hex, settings)
    if creds.client_id != device_client_id(creds.device_id):
        raise EnrollmentError("FHAI-N013", f"the coordinator pinned an unexpected client id {creds.client_id!r}")
    _write_private(state_dir / CREDENTIALS_FILE, (json.dumps(enrollment.to_json(), indent=2) + "\n").encode())
    if verify:
        check = connect(creds.client_id, settings, [], clean_start=True, timeout_s=timeout_s)
        check.close()
    log.info("enrolled as %s (site %s)", creds.device_id, creds.site)
    return enrollment


# Codes of a message that is not a genuine answer to our request (garbage, someone else's, unsigned).
_NOT_OURS = frozenset({"FHAI-N002", "FHAI-N003", "FHAI-N004", "FHAI-N009", "FHAI-N010"})


def _await_reply(
    inbox: queue.Queue[Any], request: bytes, box: X25519PrivateKey, trusted: Ed25519PublicKey | None, timeout_s: float
) -> tuple[Credentials, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EnrollmentError(
                "FHAI-N014",
                f"no answer from the enrollment service within {timeout_s:.0f}s: is "
                "`fhai-coordinator enroll-service` running? Try again; if the service did answer and the "
                "answer was lost, the token is spent and the coordinator must issue a new one.",
            )
        try:
            msg = inbox.get(timeout=left)
        except queue.Empty:
            continue
        try:
            return decode_reply(msg.payload, request, box, trusted)
        except EnrollmentError as exc:
            if isinstance(exc, EnrollmentRefusedError) or exc.code not in _NOT_OURS:
                raise
            # Not an answer to this request, or not from the coordinator: keep waiting for ours.
            log.warning("ignoring a reply that is not for this device: %s", exc)
