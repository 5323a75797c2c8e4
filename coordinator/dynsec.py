"""Mosquitto's dynamic-security plugin: who may do what on the broker, and a client for its control API.

Roles are pure data built here (one per device, plus the coordinator's, the admin's and the
bootstrap account's), so the ACLs a device gets are readable in one place. Everything not granted
is refused: the default ACL access denies publishing, subscribing and even receiving, so a client
only ever gets a message on a topic its role names.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import secrets
import threading
from typing import Any

from coordinator.errors import CoordinatorError
from edge_runtime import wire
from edge_runtime.mqtt import BrokerSettings, Connection, connect

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
# What Mosquitto 2.0's dynsec uses when it hashes a password itself. Our passwords are 256-bit random
# strings, so the iteration count adds nothing against guessing; it only costs the broker CPU per CONNECT.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12

ADMIN_ROLE = "fhai-admin"
COORDINATOR_ROLE = "fhai-coordinator"
BOOTSTRAP_ROLE = "fhai-bootstrap"
DEVICE_ROLE_PREFIX = "fhai-device-"

ENROLL_REQUESTS = f"{wire.PREFIX}/enroll/requests"
ENROLL_REPLIES = f"{wire.PREFIX}/enroll/replies"

# Nothing by default: not even receiving, so a client that took over another's session id still
# gets none of the messages queued for it unless its own role allows them.
DEFAULT_ACL_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


class DynsecError(CoordinatorError):
    """The broker's dynamic-security plugin refused a command or did not answer."""


def acl(acltype: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": allow}


def _read(topic: str) -> list[dict[str, Any]]:
    """Subscribe to `topic` and be sent what is published there."""
    return [acl("subscribePattern", topic), acl("publishClientReceive", topic)]


def _write(topic: str) -> list[dict[str, Any]]:
    return [acl("publishClientSend", topic)]


def device_role_name(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + wire.check_device_id(device_id)


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """Exactly what an enrolled device may do: send on its own update, eval and status topics, and
    read every task's round announcements, global models and exported artifacts."""
    wire.check_device_id(device_id)
    return [
        *_write(wire.update_topic("+", device_id)),
        *_write(wire.eval_topic("+", device_id)),
        *_write(wire.status_topic(device_id)),
        *_read(wire.announce_topic("+")),
        *_read(wire.model_topic("+")),
        *_read(wire.model_key_topic("+")),
        *_read(wire.model_chain_topic("+")),
        *_read(wire.artifact_topic("+", "+")),
        *_read(wire.artifact_full_topic("+", "+")),
    ]


def coordinator_acls() -> list[dict[str, Any]]:
    """The round service: publish rounds, models and artifacts; read updates, evaluations and presence."""
    return [
        *_write(wire.announce_topic("+")),
        *_write(wire.model_topic("+")),
        *_write(wire.model_key_topic("+")),
        *_write(wire.model_chain_topic("+")),
        *_write(wire.artifact_topic("+", "+")),
        *_write(wire.artifact_full_topic("+", "+")),
        *_read(wire.update_topic("+", "+")),
        *_read(wire.eval_topic("+", "+")),
        *_read(wire.status_topic("+")),
    ]


def admin_acls() -> list[dict[str, Any]]:
    """The enrollment service: the dynsec control API, enrollment requests in, sealed replies out."""
    return [
        *_write(CONTROL_TOPIC),
        *_read(RESPONSE_TOPIC),
        *_read(f"{ENROLL_REQUESTS}/+"),
        *_write(f"{ENROLL_REPLIES}/+"),
    ]


def bootstrap_acls() -> list[dict[str, Any]]:
    """A not-yet-enrolled device: one request out, the replies in. Every reply is sealed to the
    requesting device's X25519 key, so a bootstrap client reading another's reply learns nothing."""
    return [*_write(f"{ENROLL_REQUESTS}/+"), *_read(f"{ENROLL_REPLIES}/+")]


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> dict[str, Any]:
    """A password as the dynsec JSON stores it: base64 PBKDF2-HMAC-SHA512 of the raw salt."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def new_password() -> str:
    return secrets.token_urlsafe(32)


def initial_config(accounts: dict[str, tuple[str, str, str]]) -> dict[str, Any]:
    """The dynsec JSON the broker starts from. accounts: role -> (username, password, text name)."""
    roles = {
        ADMIN_ROLE: admin_acls(),
        COORDINATOR_ROLE: coordinator_acls(),
        BOOTSTRAP_ROLE: bootstrap_acls(),
    }
    clients = [
        {
            "username": user,
            "textName": text,
            **hash_password(password),
            "roles": [{"rolename": role}],
            # The enrollment service enables the shared bootstrap account only while a token is live.
            "disabled": role == BOOTSTRAP_ROLE,
        }
        for role, (user, password, text) in accounts.items()
    ]
    return {
        "defaultACLAccess": DEFAULT_ACL_ACCESS,
        "clients": clients,
        "groups": [],
        "roles": [{"rolename": name, "acls": acls} for name, acls in roles.items()],
    }


class DynsecAdmin:
    """Commands to the plugin over $CONTROL/dynamic-security/v1, one batch at a time, each answered."""

    def __init__(self, settings: BrokerSettings, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self.conn: Connection = connect(
            f"fhai-dynsec-{secrets.token_hex(6)}", settings, [RESPONSE_TOPIC], clean_start=True, timeout_s=timeout_s
        )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> DynsecAdmin:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def run(self, commands: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Send a batch; raise DynsecError on the first command that failed (unless its error is in `ignore`)."""
        tag = secrets.token_hex(8)
        batch = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
        with self._lock:
            self.conn.publish(CONTROL_TOPIC, json.dumps({"commands": batch}).encode(), wait_s=self.timeout_s)
            responses = self._responses(tag, len(batch))
        for cmd, resp in zip(commands, responses, strict=True):
            error = resp.get("error")
            if error and error not in ignore:
                raise DynsecError("FHAI-Y012", f"the broker refused {cmd['command']}: {error}")
        return responses

    def _responses(self, tag: str, n: int) -> list[dict[str, Any]]:
        got: dict[str, dict[str, Any]] = {}
        while len(got) < n:
            try:
                msg = self.conn.inbox.get(timeout=self.timeout_s)
            except queue.Empty:
                raise DynsecError(
                    "FHAI-Y011",
                    f"no answer from the dynamic-security plugin within {self.timeout_s:.0f}s: "
                    "is the broker running with it, and may this account use $CONTROL?",
                ) from None
            for resp in json.loads(msg.payload).get("responses", []):
                corr = str(resp.get("correlationData", ""))
                if corr.startswith(tag + "-"):
                    got[corr] = resp
        return [got[f"{tag}-{i}"] for i in range(n)]

    # the operations the coordinator needs ---------------------------------------------------------
    def create_device(self, device_id: str, password: str, client_id: str) -> None:
        """A client for the device, pinned to its MQTT client id, holding only its own role."""
        role = device_role_name(device_id)
        self.run(
            [
                {"command": "createRole", "rolename": role, "acls": device_acls(device_id)},
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": password,
                    "clientid": client_id,
                    "textname": f"FH-AI device {device_id}",
                    "roles": [{"rolename": role}],
                },
            ]
        )

    def delete_device(self, device_id: str) -> None:
        """Delete the device's client (the plugin disconnects its live session) and its role."""
        self.run(
            [
                {"command": "deleteClient", "username": device_id},
                {"command": "deleteRole", "rolename": device_role_name(device_id)},
            ],
            ignore=("Client not found", "Role not found"),
        )

    def client_exists(self, username: str) -> bool:
        resp = self.run([{"command": "getClient", "username": username}], ignore=("Client not found",))
        return "error" not in resp[0]
