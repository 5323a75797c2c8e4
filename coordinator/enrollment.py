"""Enrollment on the coordinator's side: one-time tokens, and the service that turns a valid request
into a broker account, a registered signing key and a sealed answer (protocol: edge_runtime/enroll.py).

The service also keeps the shared bootstrap account disabled while no token is live: on Mosquitto 2.0
any client may connect with another's client id and so end its session, and the bootstrap password is
the one secret shared by every site, so it only works while someone is expected to enroll.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.dynsec import DynsecAdmin, DynsecError, new_password
from coordinator.errors import CoordinatorError
from coordinator.store import Store
from edge_runtime import enroll as proto
from edge_runtime import wire
from edge_runtime.errors import EdgeError
from edge_runtime.mqtt import BrokerSettings, Connection, connect

log = logging.getLogger("fhai.enrollment")

TOKEN_PREFIX = "fhai_et_"  # recognisable in a leaked log or paste
BOOTSTRAP_SYNC_S = 2.0
# Keep the bootstrap account up a while after the last request, so disabling it (which also ends its
# sessions) cannot cut off a device that is still receiving its answer.
BOOTSTRAP_GRACE_S = 60.0
# Usernames of the service accounts start with this; a device may never be given one of them.
RESERVED_PREFIX = "fhai-"
_TTL = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def parse_ttl(text: str) -> float:
    """'90s', '30m', '24h', '7d' -> seconds."""
    m = _TTL.match(text.strip())
    if m is None or int(m.group(1)) == 0:
        raise CoordinatorError("FHAI-N040", f"token lifetime {text!r}: use a number and s, m, h or d, e.g. 24h")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def create_tokens(store: Store, site: str, count: int, ttl_s: float, now: float | None = None) -> list[str]:
    """`count` one-time tokens for `site`, valid for ttl_s; only their hashes are stored."""
    if not site or len(site) > 128:
        raise CoordinatorError("FHAI-N041", "give the site (hospital) the tokens are for, up to 128 characters")
    tokens = [TOKEN_PREFIX + secrets.token_urlsafe(32) for _ in range(count)]
    store.add_tokens([hash_token(t) for t in tokens], site, (now or time.time()) + ttl_s)
    return tokens


def _site_slug(site: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", site).strip("-.")[:40] or "device"
    return "site-" + slug if slug.lower().startswith(RESERVED_PREFIX) else slug


@dataclass(frozen=True)
class Outcome:
    reply: bytes
    device_id: str | None  # set when the request enrolled a device
    code: str | None = None  # the refusal's code


class EnrollmentService:
    """Answers enrollment requests. `handle` is the whole decision; `run` is the MQTT loop around it."""

    def __init__(
        self,
        store: Store,
        key: Ed25519PrivateKey,
        admin: DynsecAdmin,
        settings: BrokerSettings | None = None,
        bootstrap_user: str | None = None,
        bootstrap_grace_s: float = BOOTSTRAP_GRACE_S,
    ) -> None:
        self.store = store
        self.key = key
        self.admin = admin
        self.settings = settings
        self.bootstrap_user = bootstrap_user
        self._bootstrap_enabled: bool | None = None
        # The service loop and an operator's call may both sync: check-and-act must not interleave.
        self._bootstrap_lock = threading.Lock()
        self.bootstrap_grace_s = bootstrap_grace_s
        self._last_request = float("-inf")
        self.conn: Connection | None = None

    # one request ---------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, now: float | None = None) -> Outcome:
        now = time.time() if now is None else now
        try:
            req = proto.decode_request(payload)
            if proto.request_topic(req.nonce) != topic:
                raise CoordinatorError("FHAI-N033", "the request's nonce does not match its topic")
        except EdgeError as exc:
            log.warning("refused a malformed enrollment request on %s: %s", topic, exc)
            return Outcome(proto.encode_reply_refused(payload, exc.code, exc.message, self.key), None, exc.code)
        token_hash = hash_token(req.token)
        try:
            token = self.store.claim_token(token_hash, now)
        except CoordinatorError as exc:
            log.warning("refused an enrollment request: %s", exc.message)
            return Outcome(proto.encode_reply_refused(payload, exc.code, exc.message, self.key), None, exc.code)
        try:
            device_id = self._device_id(req, token.site)
            password = new_password()
            client_id = proto.device_client_id(device_id)
            if device_id in self._revoked():
                self.admin.delete_device(device_id)  # its broker account, if revocation left it
            self.admin.create_device(device_id, password, client_id)
            try:
                self.store.add_device(device_id, req.signing_key, token.site)
            except EdgeError:
                self.admin.delete_device(device_id)
                raise
        except EdgeError as exc:
            self.store.release_token(token_hash)  # our refusal or failure, not a use of the token
            log.warning("enrollment for site %s failed: %s", token.site, exc)
            return Outcome(proto.encode_reply_refused(payload, exc.code, exc.message, self.key), None, exc.code)
        self.store.complete_token(token_hash, device_id, json.dumps(req.profile, sort_keys=True))
        creds = proto.Credentials(device_id, token.site, device_id, password, client_id)
        log.info("enrolled %s for site %s (key %s...)", device_id, token.site, req.signing_key[:16])
        return Outcome(proto.encode_reply_ok(payload, req, creds, self.key), device_id)

    def _revoked(self) -> set[str]:
        return {d.id for d in self.store.devices() if d.revoked_at is not None}

    def _device_id(self, req: proto.EnrollRequest, site: str) -> str:
        if req.site is not None and req.site != site:
            raise CoordinatorError(
                "FHAI-N034", f"this token is for site {site!r}, the device says {req.site!r}: use that site's token"
            )
        known = {d.id: d for d in self.store.devices()}
        if req.device_id is not None:
            if req.device_id.lower().startswith(RESERVED_PREFIX):
                raise CoordinatorError("FHAI-N037", f"device ids starting with {RESERVED_PREFIX!r} are reserved")
            existing = known.get(req.device_id)
            if existing is not None and existing.revoked_at is None:
                raise CoordinatorError(
                    "FHAI-N035", f"device id {req.device_id!r} is taken: ask for another, or revoke the old device"
                )
            if existing is not None and existing.site != site:
                raise CoordinatorError("FHAI-N036", f"device id {req.device_id!r} belonged to another site")
            return wire.check_device_id(req.device_id)
        while True:
            candidate = f"{_site_slug(site)}-{secrets.token_hex(3)}"
            if candidate not in known:
                return wire.check_device_id(candidate)

    # the bootstrap window ------------------------------------------------------------------------
    def sync_bootstrap(self, now: float | None = None) -> bool:
        """Enable the bootstrap account while a token is live (and for a grace period after the last
        request), disable it otherwise; returns whether it is enabled."""
        with self._bootstrap_lock:
            live = self.store.live_tokens(time.time() if now is None else now) > 0
            live = live or time.monotonic() - self._last_request < self.bootstrap_grace_s
            if self.bootstrap_user is not None and live != self._bootstrap_enabled:
                command = "enableClient" if live else "disableClient"
                self.admin.run([{"command": command, "username": self.bootstrap_user}])
                self._bootstrap_enabled = live
                log.info("bootstrap account %s %s", self.bootstrap_user, "enabled" if live else "disabled")
            return live

    # the loop ------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, ready: threading.Event | None = None) -> None:
        """Serve requests until `stop` is set."""
        if self.settings is None:
            raise CoordinatorError("FHAI-N042", "the enrollment service needs the admin account's broker settings")
        stop = stop or threading.Event()
        self.conn = connect(
            f"fhai-enroll-service-{secrets.token_hex(4)}",
            self.settings,
            [f"{proto.REQUESTS}/+"],
            clean_start=True,
        )
        last_sync = 0.0
        try:
            if ready is not None:
                ready.set()
            while not stop.is_set():
                if time.monotonic() - last_sync > BOOTSTRAP_SYNC_S:
                    try:
                        self.sync_bootstrap()
                    except DynsecError as exc:
                        log.error("could not update the bootstrap account: %s", exc)
                    last_sync = time.monotonic()
                try:
                    msg = self.conn.inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                nonce = wire.device_from_topic(msg.topic)
                self._last_request = time.monotonic()
                outcome = self.handle(msg.topic, msg.payload)
                try:
                    self.conn.publish(proto.reply_topic(proto.check_nonce(nonce)), outcome.reply, expiry_s=300)
                except EdgeError as exc:
                    log.error("could not answer the enrollment request %s: %s", nonce, exc)
        finally:
            self.conn.close()
