"""Ed25519 signing keys on disk (PEM, mode 0600) and their public halves as hex for registries."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import EdgeError


class KeyFileError(EdgeError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the key at `path`, or make one there (0600) if the file does not exist yet."""
    if path.exists():
        return load_signing_key(path)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise KeyFileError("FHAI-K001", f"cannot read the signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError("FHAI-K002", f"{path} is not an Ed25519 private key")
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_from_hex(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except ValueError as exc:
        raise KeyFileError("FHAI-K003", f"not a 32-byte hex Ed25519 public key: {text[:16]}...") from exc
