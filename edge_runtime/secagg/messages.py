"""The secure-aggregation messages, as dataclasses with explicit msgpack encodings (no pickle).

Four rounds (Bonawitz et al. 2017, with Bell et al. 2020's sparse graph), each a device message and
the coordinator's reply:

  0. `AdvertiseKeys` (device: two X25519 public keys)       -> `Roster` (every device's keys, the graph)
  1. `ShareKeys` (device: AEAD-sealed Shamir shares)        -> `ShareDelivery` (the shares sealed for one device)
  2. `MaskedInput` (device: its ring vector plus masks)     -> `UnmaskRequest` (who survived, who dropped)
  3. `UnmaskResponse` (device: shares of survivors' seeds and of the dropped devices' mask keys)

Every message carries the round context (task, round, round nonce) and is signed with Ed25519 by its
sender (the device's enrolled key, or the coordinator's); `signed_bytes` is the msgpack of all fields
but the signature, in a fixed order, so a verifier re-encodes exactly what was signed. `decode`
checks types, lengths and counts before anything is built, and raises ProtocolError (FHAI-V603).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Self, TypeVar

import msgpack
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.secagg.crypto import KEY_BYTES, NONCE_BYTES, ROUND_NONCE_BYTES, RoundContext
from edge_runtime.secagg.errors import ProtocolError
from edge_runtime.secagg.shamir import SHARE_BYTES

VERSION = 1
SIGNATURE_BYTES = 64
MAX_DEVICES = 1 << 16
MAX_ID_CHARS = 64
MAX_SEALED_BYTES = 512
MAX_VECTOR_BYTES = 256 << 20


def _fail(what: str) -> ProtocolError:
    return ProtocolError("FHAI-V603", f"malformed secure-aggregation message: {what}")


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise _fail(f"{what} must be a text id of 1-{MAX_ID_CHARS} characters")
    return value


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _fail(f"{what} must be an integer in {lo}..{hi}")
    return value


def _bytes(value: Any, what: str, size: int | None = None, max_size: int | None = None) -> bytes:
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise _fail(f"{what} must be {size if size is not None else 'some'} bytes")
    if max_size is not None and len(value) > max_size:
        raise _fail(f"{what} exceeds {max_size} bytes")
    return value


def _list(value: Any, what: str, max_len: int = MAX_DEVICES) -> list[Any]:
    if not isinstance(value, list) or len(value) > max_len:
        raise _fail(f"{what} must be a list of at most {max_len} items")
    return value


def _ids(value: Any, what: str) -> tuple[str, ...]:
    ids = tuple(_str(v, what) for v in _list(value, what))
    if len(set(ids)) != len(ids):
        raise _fail(f"{what} lists a device twice")
    return ids


def _ctx(raw: Any) -> RoundContext:
    items = _list(raw, "context", 3)
    if len(items) != 3:
        raise _fail("context is [task, round, nonce]")
    return RoundContext(
        _str(items[0], "task"), _int(items[1], "round", 0, 2**31), _bytes(items[2], "round nonce", ROUND_NONCE_BYTES)
    )


@dataclass(frozen=True)
class Message:
    """Base: a signed message of one round. Subclasses list their fields after `ctx` and `sender`."""

    TYPE: ClassVar[str]
    ctx: RoundContext
    sender: str

    def _wire_fields(self) -> list[Any]:
        """The fields after ctx and sender, as msgpack-ready values, in declaration order (no signature)."""
        return [_to_wire(getattr(self, f.name)) for f in fields(self) if f.name not in ("ctx", "sender", "signature")]

    def signed_bytes(self) -> bytes:
        ctx = [self.ctx.task, self.ctx.round, self.ctx.nonce]
        return msgpack.packb([VERSION, self.TYPE, ctx, self.sender, *self._wire_fields()], use_bin_type=True)

    def encode(self) -> bytes:
        signature = getattr(self, "signature", b"")
        return msgpack.packb([self.signed_bytes(), signature], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes, max_bytes: int = MAX_VECTOR_BYTES + (1 << 20)) -> Self:
        if not isinstance(data, bytes) or len(data) > max_bytes:
            raise _fail(f"a {cls.TYPE} message must be at most {max_bytes} bytes")
        try:
            outer = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes)
            signed, signature = outer
            body = msgpack.unpackb(signed, raw=False, strict_map_key=True, max_bin_len=max_bytes)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise _fail(f"not msgpack ({type(exc).__name__})") from exc
        body = _list(body, "message", 64)
        if len(body) < 4 or body[0] != VERSION or body[1] != cls.TYPE:
            raise _fail(f"expected a version-{VERSION} {cls.TYPE} message")
        ctx = _ctx(body[2])
        sender = _str(body[3], "sender")
        msg = cls._from_fields(ctx, sender, body[4:], _bytes(signature, "signature", SIGNATURE_BYTES))
        if msg.signed_bytes() != signed:  # one canonical encoding: no second reading of the same signature
            raise _fail("fields are not in their canonical encoding")
        return msg

    @classmethod
    def _from_fields(cls, ctx: RoundContext, sender: str, raw: list[Any], signature: bytes) -> Self:
        raise NotImplementedError

    def verify(self, key: Ed25519PublicKey, ctx: RoundContext, sender: str | None = None) -> None:
        """Refuse a message of another round or task, from someone else, or whose signature fails."""
        if self.ctx != ctx:
            raise ProtocolError(
                "FHAI-V604",
                f"{self.TYPE} from {self.sender} is for {self.ctx.task!r} round {self.ctx.round}, not "
                f"{ctx.task!r} round {ctx.round} (a replay or a wrong-round message)",
                self.sender,
            )
        if sender is not None and self.sender != sender:
            raise ProtocolError("FHAI-V604", f"{self.TYPE} claims sender {self.sender}, expected {sender}", self.sender)
        try:
            key.verify(getattr(self, "signature", b""), self.signed_bytes())
        except InvalidSignature as exc:
            raise ProtocolError(
                "FHAI-V604", f"{self.TYPE} from {self.sender} has a signature that does not verify", self.sender
            ) from exc


def _to_wire(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, SealedShare | RosterEntry | RevealedShare):
        return value.to_wire()
    return value


M = TypeVar("M", bound=Message)


def sign(message: M, key: Ed25519PrivateKey) -> M:
    """The message with its Ed25519 signature over `signed_bytes()` filled in."""
    return replace(message, signature=key.sign(message.signed_bytes()))  # type: ignore[call-arg]


# --- round 0: keys ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys(Message):
    TYPE: ClassVar[str] = "advertise"
    enc_pk: bytes  # X25519 key for sealing shares
    mask_pk: bytes  # X25519 key for pairwise masks
    signature: bytes = b""

    @classmethod
    def _from_fields(cls, ctx: RoundContext, sender: str, raw: list[Any], signature: bytes) -> Self:
        if len(raw) != 2:
            raise _fail("advertise has two keys")
        return cls(ctx, sender, _bytes(raw[0], "enc_pk", KEY_BYTES), _bytes(raw[1], "mask_pk", KEY_BYTES), signature)


@dataclass(frozen=True)
class RosterEntry:
    """One device's advertised keys as the coordinator relays them, with the device's own signature."""

    device: str
    signing_pk: bytes  # the device's enrolled Ed25519 key, from the coordinator's registry
    enc_pk: bytes
    mask_pk: bytes
    signature: bytes  # the device's signature of its AdvertiseKeys

    def to_wire(self) -> list[Any]:
        return [self.device, self.signing_pk, self.enc_pk, self.mask_pk, self.signature]

    @classmethod
    def from_wire(cls, raw: Any) -> RosterEntry:
        items = _list(raw, "roster entry", 5)
        if len(items) != 5:
            raise _fail("a roster entry has 5 fields")
        return cls(
            _str(items[0], "device"),
            _bytes(items[1], "signing_pk", KEY_BYTES),
            _bytes(items[2], "enc_pk", KEY_BYTES),
            _bytes(items[3], "mask_pk", KEY_BYTES),
            _bytes(items[4], "advertise signature", SIGNATURE_BYTES),
        )

    def advertisement(self, ctx: RoundContext) -> AdvertiseKeys:
        return AdvertiseKeys(ctx, self.device, self.enc_pk, self.mask_pk, self.signature)


@dataclass(frozen=True)
class Roster(Message):
    """The coordinator's list of devices that advertised keys, and the graph and threshold of the round."""

    TYPE: ClassVar[str] = "roster"
    graph_seed: bytes
    degree: int
    threshold: int
    entries: tuple[RosterEntry, ...]
    signature: bytes = b""

    @classmethod
    def _from_fields(cls, ctx: RoundContext, sender: str, raw: list[Any], signature: bytes) -> Self:
        if len(raw) != 4:
            raise _fail("roster has 4 fields")
        entries = tuple(RosterEntry.from_wire(e) for e in _list(raw[3], "entries"))
        if len({e.device for e in entries}) != len(entries):
            raise _fail("roster lists a device twice")
        return cls(
            ctx,
            sender,
            _bytes(raw[0], "graph_seed", 32),
            _int(raw[1], "degree", 1, MAX_DEVICES),
            _int(raw[2], "threshold", 1, MAX_DEVICES),
            entries,
            signature,
        )


# --- round 1: shares --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedShare:
    """Shares of the sender's mask key and self-mask seed, sealed with ChaCha20-Poly1305 for `recipient`."""

    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes

    def to_wire(self) -> list[Any]:
        return [self.sender, self.recipient, self.nonce, self.ciphertext]

    @classmethod
    def from_wire(cls, raw: Any) -> SealedShare:
        items = _list(raw, "sealed share", 4)
        if len(items) != 4:
            raise _fail("a sealed share has 4 fields")
        return cls(
            _str(items[0], "share sender"),
            _str(items[1], "share recipient"),
            _bytes(items[2], "share nonce", NONCE_BYTES),
            _bytes(items[3], "share ciphertext", max_size=MAX_SEALED_BYTES),
        )


@dataclass(frozen=True)
class ShareKeys(Message):
    TYPE: ClassVar[str] = "share_keys"
    commitment: bytes  # SHA-256 commitment to the self-mask seed (crypto.seed_commitment)
    shares: tuple[SealedShare, ...]
    signature: bytes = b""

    @classmethod
    def _from_fields(cls, ctx: RoundContext, sender: str, raw: list[Any], signature: bytes) -> Self:
        if len(raw) != 2:
            raise _fail("share_keys has two fields")
        commitment = _bytes(raw[0], "seed commitment", 32)
        shares = tuple(SealedShare.from_wire(s) for s in _list(raw[1], "shares"))
        if any(s.sender != sender for s in shares) or len({s.recipient for s in shares}) != len(shares):
            raise _fail("share_keys holds shares of another sender, or two for one recipient")
        return cls(ctx, sender, commitment, shares, signature)


@dataclass(frozen=True)
class ShareDelivery(Message):
    """The sealed shares addressed to one device, relayed by the coordinator."""

    TYPE: ClassVar[str] = "share_delivery"
    recipient: str
    shares: tuple[SealedShare, ...]
    signature: bytes = b""

    @classmethod
    def _from_fields(cls, ctx: RoundContext, sender: str, raw: list[Any], signature: bytes) -> Self:
        if len(raw) != 2:
            raise _fail("share_delivery has two fields")
        recipient = _str(raw[0], "recipient")
        shares = tuple(SealedShare.from_wire(s) for s in _list(raw[1], "shares"))
        if any(s.recipient != recipient for s in shares) or len({s.sender for s in shares}) != len(shares):
            raise _fail("share_delivery holds shares for someone else, or two from one sender")
        return cls(ctx, sender, recipient, shares, signature)


# --- round 2: masked input --------------------------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """uint32 values < 2^bits, bit-packed little-endian: exactly ceil(n·bits/8) bytes."""
    v = np.ascontiguousarray(values, dtype=np.uint32)
    if bits in (8, 16, 32):
        return v.astype({8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]).astype("<u" + str(bits // 8)).tobytes()
    as_bytes = v.astype("<u4").view(np.uint8).reshape(-1, 4)
    bit_rows = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_rows.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    """The inverse of `pack_bits`."""
    if len(data) != (n * bits + 7) // 8:
        raise _fail(f"{n} values of {bits} bits take {(n * bits + 7) // 8} bytes, got {len(data)}")
    if bits in (8, 16, 32):
        return np.frombuffer(data, dtype="<u" + str(bits // 8)).astype(np.uint32)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * bits].reshape(n, bits)
    padded = np.zeros((n, 32), dtype=np.uint8)
    padded[:, :bits] = flat
    return np.packbits(padded, axis=1, bitorder="little").view("<u4").reshape(n).astype(np.uint32)


@dataclass(frozen=True)
class MaskedInput(Message):
    TYPE: ClassVar[str] = "masked_input"
    ring_bits: int
    length: int
    packed: bytes  # the masked vector mod 2^ring_bits, `pack_bits`
    signature: bytes = b""

    @classmethod
    def _from_fields(cls, ctx: RoundContext, sender: str, raw: list[Any], signature: bytes) -> Self:
        if len(raw) != 3:
            raise _fail("masked_input has three fields")
        ring_bits = _int(raw[0], "ring_bits", 1, 32)
        length = _int(raw[1], "length", 1, 1 << 26)
        packed = _bytes(raw[2], "masked vector", (length * ring_bits + 7) // 8)
        return cls(ctx, sender, ring_bits, length, packed, signature)

    def vector(self) -> np.ndarray:
        return unpack_bits(self.packed, self.ring_bits, self.length)


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Who sent a masked input (their seeds are rebuilt) and who dropped after sharing (their mask keys)."""

    TYPE: ClassVar[str] = "unmask_request"
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signature: bytes = b""

    @classmethod
    def _from_fields(cls, ctx: RoundContext, sender: str, raw: list[Any], signature: bytes) -> Self:
        if len(raw) != 2:
            raise _fail("unmask_request has two fields")
        return cls(ctx, sender, _ids(raw[0], "survivors"), _ids(raw[1], "dropped"), signature)


# --- round 3: unmasking -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RevealedShare:
    """A share the device received from `owner`: of its self-mask seed (survivor) or mask key (dropped)."""

    owner: str
    value: bytes  # SHARE_BYTES

    def to_wire(self) -> list[Any]:
        return [self.owner, self.value]

    @classmethod
    def from_wire(cls, raw: Any) -> RevealedShare:
        items = _list(raw, "revealed share", 2)
        if len(items) != 2:
            raise _fail("a revealed share has 2 fields")
        return cls(_str(items[0], "share owner"), _bytes(items[1], "share value", SHARE_BYTES))


@dataclass(frozen=True)
class UnmaskResponse(Message):
    TYPE: ClassVar[str] = "unmask_response"
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]
    signature: bytes = b""

    @classmethod
    def _from_fields(cls, ctx: RoundContext, sender: str, raw: list[Any], signature: bytes) -> Self:
        if len(raw) != 2:
            raise _fail("unmask_response has two fields")
        seeds = tuple(RevealedShare.from_wire(s) for s in _list(raw[0], "seed shares"))
        keys = tuple(RevealedShare.from_wire(s) for s in _list(raw[1], "key shares"))
        owners = [s.owner for s in seeds] + [s.owner for s in keys]
        if len(set(owners)) != len(owners):
            raise _fail("unmask_response reveals two shares of one device")
        return cls(ctx, sender, seeds, keys, signature)
