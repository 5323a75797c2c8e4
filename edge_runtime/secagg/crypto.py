"""The cryptography of secure aggregation, all from `cryptography`: X25519, HKDF-SHA256, ChaCha20(-Poly1305).

Every derived key is bound to the round's context (task, round number, the coordinator's fresh round
nonce) through HKDF's info, and every AEAD ciphertext to (context, sender, recipient) through its
associated data: a share or mask from another round, task or pair of devices does not decrypt or cancel.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edge_runtime.secagg.errors import ProtocolError

DOMAIN = b"fhai-secagg-v1"
KEY_BYTES = 32
NONCE_BYTES = 12
ROUND_NONCE_BYTES = 16


@dataclass(frozen=True)
class RoundContext:
    """What binds every key, mask and share to one round of one task."""

    task: str
    round: int
    nonce: bytes  # ROUND_NONCE_BYTES fresh random bytes from the coordinator, so a restarted round differs

    def encode(self) -> bytes:
        return msgpack.packb([DOMAIN, self.task, self.round, self.nonce], use_bin_type=True)


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def hkdf(secret: bytes, purpose: bytes, ctx: RoundContext, *parts: str) -> bytes:
    """A 32-byte key for `purpose`, bound to the round context and the named parties."""
    info = msgpack.packb([purpose, ctx.encode(), *parts], use_bin_type=True)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def agree(own: X25519PrivateKey, peer: bytes, purpose: bytes, ctx: RoundContext, a: str, b: str) -> bytes:
    """The key two devices a, b both derive from X25519; the pair is ordered so both get the same key."""
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError as exc:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise ProtocolError("FHAI-V604", f"key agreement with {b if a < b else a} failed ({exc})") from exc
    lo, hi = sorted((a, b))
    return hkdf(shared, purpose, ctx, lo, hi)


def expand(key: bytes, n: int) -> np.ndarray:
    """n uint32 words of ChaCha20 keystream (the PRG of masks), generated in one call."""
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    out = np.zeros(n, dtype=np.uint32)
    view = out.data.cast("B")
    encryptor.update_into(view, view)  # keystream XOR zeros, in place: no second buffer
    return out


def aad(ctx: RoundContext, kind: bytes, sender: str, recipient: str) -> bytes:
    return msgpack.packb([kind, ctx.encode(), sender, recipient], use_bin_type=True)


def seal(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes, sender: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, associated)
    except InvalidTag as exc:
        raise ProtocolError(
            "FHAI-V604",
            f"the share from {sender} does not decrypt for this round: forged, altered, replayed from another "
            "round or task, or sent to someone else",
            sender,
        ) from exc


def seed_commitment(seed: bytes, ctx: RoundContext, device: str) -> bytes:
    """SHA-256 commitment to a self-mask seed, so a rebuilt seed can be checked (a false share found)."""
    return hashlib.sha256(msgpack.packb([b"seed commitment", ctx.encode(), device, seed], use_bin_type=True)).digest()
