"""Wire protocol v1: signed frames and the topic names. See docs/protocol.md.

A frame is  b"FHAI" | version u8 | header length u32 LE | header (msgpack map) | body | Ed25519 signature (64 B)
and the signature covers every byte before it. The header says who sent the frame and what it is;
the body is opaque bytes (a codec body, model parameters). Nothing on the wire is pickled.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import EdgeError

MAGIC = b"FHAI"
VERSION = 1
CONTENT_TYPE = "application/vnd.fhai.frame.v1"
SIGNATURE_LEN = 64
_PREFIX = struct.Struct("<4sBI")
MAX_HEADER_BYTES = 16 * 1024
# Largest frame anyone accepts: a float32 update of 16M parameters plus headroom. Tasks set tighter limits.
MAX_FRAME_BYTES = 64 * 1024 * 1024

KINDS = ("announce", "model", "stats", "update", "eval", "artifact")
COORDINATOR = "coordinator"


class WireError(EdgeError):
    """A frame that is malformed, oversized, or not signed by who it claims."""


@dataclass(frozen=True)
class Frame:
    header: dict[str, Any]
    body: bytes

    @property
    def kind(self) -> str:
        return str(self.header["kind"])

    @property
    def sender(self) -> str:
        return str(self.header["sender"])


def encode_frame(kind: str, sender: str, header: dict[str, Any], body: bytes, key: Ed25519PrivateKey) -> bytes:
    """Sign and serialise one frame. `header` holds the kind-specific fields."""
    if kind not in KINDS:
        raise WireError("FHAI-W001", f"unknown frame kind {kind!r}; expected one of {KINDS}")
    full = {
        **header,
        "kind": kind,
        "sender": sender,
        "ts": time.time(),
        "nonce": os.urandom(12),
        "body_len": len(body),
    }
    head = msgpack.packb(full, use_bin_type=True)
    if len(head) > MAX_HEADER_BYTES:
        raise WireError("FHAI-W002", f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    unsigned = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + body
    return unsigned + key.sign(unsigned)


def peek_header(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Parse the prefix and header without checking the signature (to find whose key to check it with)."""
    if len(data) > max_bytes:
        raise WireError("FHAI-W003", f"frame of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) < _PREFIX.size + SIGNATURE_LEN:
        raise WireError("FHAI-W004", f"frame of {len(data)} bytes is too short to be an FH-AI frame")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError("FHAI-W005", "not an FH-AI frame (bad magic): check the publisher's protocol version")
    if version != VERSION:
        raise WireError("FHAI-W006", f"frame version {version} is not supported (this runtime speaks {VERSION})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len + SIGNATURE_LEN > len(data):
        raise WireError("FHAI-W007", f"header length {head_len} does not fit in a {len(data)}-byte frame")
    try:
        header = msgpack.unpackb(
            data[_PREFIX.size : _PREFIX.size + head_len],
            raw=False,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError("FHAI-W008", f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise WireError("FHAI-W008", "header is not a msgpack map")
    for field, typ in (("kind", str), ("sender", str), ("body_len", int), ("ts", float)):
        if not isinstance(header.get(field), typ):
            raise WireError("FHAI-W009", f"header field {field!r} is missing or not a {typ.__name__}")
    if header["kind"] not in KINDS:
        raise WireError("FHAI-W001", f"unknown frame kind {header['kind']!r}")
    if _PREFIX.size + head_len + header["body_len"] + SIGNATURE_LEN != len(data):
        raise WireError("FHAI-W010", "body length in the header does not match the frame size")
    return header


def decode_frame(
    data: bytes,
    public_key_for: Callable[[str], Ed25519PublicKey | None],
    max_bytes: int = MAX_FRAME_BYTES,
) -> Frame:
    """Check size, structure and the sender's signature; return the frame or raise WireError."""
    header = peek_header(data, max_bytes)
    key = public_key_for(header["sender"])
    if key is None:
        raise WireError("FHAI-W011", f"sender {header['sender']!r} is not enrolled: no public key on record")
    # Verify over a view: slicing the bytes would copy the whole frame (about 1 MB for an update) first.
    view = memoryview(data)
    end = len(data) - SIGNATURE_LEN
    try:
        key.verify(bytes(view[end:]), view[:end])
    except InvalidSignature as exc:
        raise WireError("FHAI-W012", f"signature does not verify for sender {header['sender']!r}") from exc
    return Frame(header, bytes(view[end - header["body_len"] : end]))


# Topics. One update and one eval topic per device so broker ACLs can pin each device to its own.
PREFIX = "fhai/v1"


def announce_topic(task: str) -> str:
    return f"{PREFIX}/tasks/{task}/round"


def model_topic(task: str) -> str:
    return f"{PREFIX}/tasks/{task}/model"


def model_key_topic(task: str) -> str:
    """The retained keyframe of the quantized downlink; devices subscribe only while they catch up."""
    return f"{PREFIX}/tasks/{task}/model/key"


def model_chain_topic(task: str) -> str:
    """The retained chain of model patches since the keyframe; subscribed only while catching up."""
    return f"{PREFIX}/tasks/{task}/model/chain"


def artifact_topic(task: str, fmt: str) -> str:
    return f"{PREFIX}/tasks/{task}/artifacts/{fmt}"


def artifact_full_topic(task: str, fmt: str) -> str:
    """The retained whole artifact, for a device that cannot rebuild the export from the parameters it holds."""
    return f"{artifact_topic(task, fmt)}/full"


def update_topic(task: str, device: str) -> str:
    return f"{PREFIX}/tasks/{task}/updates/{device}"


def eval_topic(task: str, device: str) -> str:
    return f"{PREFIX}/tasks/{task}/eval/{device}"


def status_topic(device: str) -> str:
    return f"{PREFIX}/devices/{device}/status"


def device_from_topic(topic: str) -> str:
    """The device id a per-device topic names (its last level)."""
    return topic.rsplit("/", 1)[-1]


def check_device_id(device_id: str) -> str:
    """Device ids become topic levels: no wildcards, separators or control characters."""
    if not device_id or len(device_id) > 64 or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in device_id):
        raise WireError(
            "FHAI-W013",
            f"device id {device_id!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.'",
        )
    return device_id
