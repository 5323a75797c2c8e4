"""What a device runs in one round of secure aggregation: a small state machine with no I/O.

    client = SecAggClient(ctx, device_id, signing_key, coordinator_key)
    advertise = client.advertise()                     # -> coordinator
    share_keys = client.share_keys(roster)             # roster <- coordinator
    masked = client.masked_input(delivery, ring_vec, k)  # delivery <- coordinator; ring_vec from grid.py
    response = client.unmask(request)                  # request <- coordinator

The device's input never leaves it unmasked: it adds its self mask PRG(b_u) and, for each neighbour v
whose shares it received, +PRG(s_uv) if u sorts before v and -PRG(s_uv) otherwise, all mod 2^32 (the
ring Z_{2^k} divides it). It reveals, per neighbour, a share of the self-mask seed (neighbour survived)
or of the mask key (neighbour dropped), never both: a coordinator that asked for both for one device
could unmask that device, so such a request is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_runtime.secagg import crypto, graph, shamir
from edge_runtime.secagg.errors import ProtocolError
from edge_runtime.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    RevealedShare,
    Roster,
    SealedShare,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    pack_bits,
    sign,
)

PAIRWISE = b"pairwise mask"
SELF_MASK = b"self mask"
SHARE_KEY = b"share sealing"
SHARE_AAD = b"share"


def self_mask(seed: bytes, ctx: crypto.RoundContext, device: str, n: int) -> np.ndarray:
    return crypto.expand(crypto.hkdf(seed, SELF_MASK, ctx, device), n)


def pairwise_mask(key: bytes, me: str, other: str, n: int) -> np.ndarray:
    """The mask `me` adds for the pair (me, other): +PRG when me sorts first, -PRG (mod 2^32) otherwise."""
    mask = crypto.expand(key, n)
    return mask if me < other else np.negative(mask)  # uint32 negation wraps: -m mod 2^32


@dataclass(frozen=True)
class ReceivedShare:
    seed_share: int
    key_share: int


def seal_shares(
    ctx: crypto.RoundContext,
    sender: str,
    enc_sk: X25519PrivateKey,
    recipients: dict[str, tuple[int, bytes]],
    seed_shares: dict[str, int],
    key_shares: dict[str, int],
) -> tuple[SealedShare, ...]:
    """One AEAD-sealed pair of shares per recipient (name -> (Shamir point, X25519 enc key))."""
    out = []
    for name, (_, enc_pk) in sorted(recipients.items()):
        key = crypto.agree(enc_sk, enc_pk, SHARE_KEY, ctx, sender, name)
        plain = msgpack.packb(
            [shamir.share_to_bytes(seed_shares[name]), shamir.share_to_bytes(key_shares[name])],
            use_bin_type=True,
        )
        nonce = os.urandom(crypto.NONCE_BYTES)
        sealed = crypto.seal(key, nonce, plain, crypto.aad(ctx, SHARE_AAD, sender, name))
        out.append(SealedShare(sender, name, nonce, sealed))
    return tuple(out)


class SecAggClient:
    """One device's side of one secure-aggregation round."""

    def __init__(
        self,
        ctx: crypto.RoundContext,
        device: str,
        signing_key: Ed25519PrivateKey,
        coordinator_key: Ed25519PublicKey,
        coordinator: str = "coordinator",
    ) -> None:
        self.ctx = ctx
        self.device = device
        self._signing_key = signing_key
        self._coordinator_key = coordinator_key
        self._coordinator = coordinator
        self._enc_sk = X25519PrivateKey.generate()
        self._mask_sk = X25519PrivateKey.generate()
        self._seed = os.urandom(shamir.SECRET_BYTES)
        self._stage = "advertise"
        self._neighbours: dict[str, tuple[int, bytes, bytes]] = {}  # name -> (point, enc_pk, mask_pk)
        self._received: dict[str, ReceivedShare] = {}
        self._masked_with: set[str] = set()

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise ProtocolError("FHAI-V605", f"{self.device} is at stage {self._stage!r}, got a {stage!r} step")

    def advertise(self) -> AdvertiseKeys:
        self._expect("advertise")
        self._stage = "share"
        msg = AdvertiseKeys(
            self.ctx, self.device, crypto.public_bytes(self._enc_sk), crypto.public_bytes(self._mask_sk)
        )
        return sign(msg, self._signing_key)

    def share_keys(self, roster: Roster) -> ShareKeys:
        """Check the roster, then Shamir-share the mask key and self-mask seed among this device's neighbours."""
        self._expect("share")
        roster.verify(self._coordinator_key, self.ctx, self._coordinator)
        names = [e.device for e in roster.entries]
        if self.device not in names:
            raise ProtocolError(
                "FHAI-V605", f"the roster does not list {self.device}: it was not admitted to the round"
            )
        points = {name: i + 1 for i, name in enumerate(sorted(names))}
        by_name = {e.device: e for e in roster.entries}
        mine = by_name[self.device]
        if (mine.enc_pk, mine.mask_pk) != (crypto.public_bytes(self._enc_sk), crypto.public_bytes(self._mask_sk)):
            raise ProtocolError("FHAI-V604", "the roster carries other keys for this device than it advertised")
        neighbour_names = graph.neighbours(names, roster.graph_seed, roster.degree)[self.device]
        if not roster.threshold <= len(neighbour_names):
            raise ProtocolError(
                "FHAI-V606", f"threshold {roster.threshold} exceeds the {len(neighbour_names)} neighbours"
            )
        for name in neighbour_names:
            entry = by_name[name]
            try:
                signer = Ed25519PublicKey.from_public_bytes(entry.signing_pk)
            except ValueError as exc:
                raise ProtocolError("FHAI-V603", f"{name}'s signing key in the roster is invalid", name) from exc
            entry.advertisement(self.ctx).verify(signer, self.ctx)
            self._neighbours[name] = (points[name], entry.enc_pk, entry.mask_pk)
        xs = [self._neighbours[n][0] for n in neighbour_names]
        seed_values = shamir.split(shamir.secret_to_int(self._seed), roster.threshold, xs)
        key_values = shamir.split(shamir.secret_to_int(crypto.private_bytes(self._mask_sk)), roster.threshold, xs)
        commitment = crypto.seed_commitment(self._seed, self.ctx, self.device)
        sealed = seal_shares(
            self.ctx,
            self.device,
            self._enc_sk,
            {n: (self._neighbours[n][0], self._neighbours[n][1]) for n in neighbour_names},
            dict(zip(neighbour_names, seed_values, strict=True)),
            dict(zip(neighbour_names, key_values, strict=True)),
        )
        self._stage = "mask"
        return sign(ShareKeys(self.ctx, self.device, commitment, sealed), self._signing_key)

    def masked_input(self, delivery: ShareDelivery, ring_vector: np.ndarray, ring_bits: int) -> MaskedInput:
        """Open the neighbours' shares (refusing any that fail), then mask the ring vector with them."""
        self._expect("mask")
        delivery.verify(self._coordinator_key, self.ctx, self._coordinator)
        if delivery.recipient != self.device:
            raise ProtocolError("FHAI-V605", f"share delivery is for {delivery.recipient}, not {self.device}")
        for sealed in delivery.shares:
            if sealed.sender not in self._neighbours:
                raise ProtocolError("FHAI-V605", f"a share from {sealed.sender}, who is not a neighbour", sealed.sender)
            self._received[sealed.sender] = self._open(sealed)
        x = np.ascontiguousarray(ring_vector, dtype=np.uint32)
        if not 1 <= ring_bits <= 32 or (ring_bits < 32 and int(x.max(initial=0)) >> ring_bits):
            raise ProtocolError("FHAI-V602", f"ring vector does not fit Z_2^{ring_bits}")
        y = x + self_mask(self._seed, self.ctx, self.device, x.size)
        for name in sorted(self._received):
            key = crypto.agree(self._mask_sk, self._neighbours[name][2], PAIRWISE, self.ctx, self.device, name)
            y += pairwise_mask(key, self.device, name, x.size)
        self._masked_with = set(self._received)
        if ring_bits < 32:
            y &= np.uint32((1 << ring_bits) - 1)
        self._stage = "unmask"
        return sign(MaskedInput(self.ctx, self.device, ring_bits, x.size, pack_bits(y, ring_bits)), self._signing_key)

    def _open(self, sealed: SealedShare) -> ReceivedShare:
        _, enc_pk, _ = self._neighbours[sealed.sender]
        key = crypto.agree(self._enc_sk, enc_pk, SHARE_KEY, self.ctx, self.device, sealed.sender)
        plain = crypto.open_sealed(
            key,
            sealed.nonce,
            sealed.ciphertext,
            crypto.aad(self.ctx, SHARE_AAD, sealed.sender, self.device),
            sealed.sender,
        )
        try:
            seed_share, key_share = msgpack.unpackb(plain, raw=False)
            return ReceivedShare(shamir.share_from_bytes(seed_share), shamir.share_from_bytes(key_share))
        except (ValueError, TypeError) as exc:
            raise ProtocolError(
                "FHAI-V607", f"the share from {sealed.sender} is malformed inside", sealed.sender
            ) from exc

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal seed shares of survivors and key shares of dropped neighbours, never both for one device."""
        self._expect("unmask")
        request.verify(self._coordinator_key, self.ctx, self._coordinator)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ProtocolError(
                "FHAI-V605", "the coordinator asked for both secrets of one device: refusing to unmask anyone"
            )
        if self.device not in survivors:
            raise ProtocolError("FHAI-V605", "the unmask request does not count this device among the survivors")
        seeds = tuple(
            RevealedShare(n, shamir.share_to_bytes(self._received[n].seed_share))
            for n in sorted(survivors & self._masked_with)
        )
        keys = tuple(
            RevealedShare(n, shamir.share_to_bytes(self._received[n].key_share))
            for n in sorted(dropped & self._masked_with)
        )
        self._stage = "done"
        return sign(UnmaskResponse(self.ctx, self.device, seeds, keys), self._signing_key)
