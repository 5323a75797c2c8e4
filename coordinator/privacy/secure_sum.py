"""The coordinator's side of one secure-aggregation round: a state machine with no I/O.

It relays keys and sealed shares it cannot read, keeps one running uint32 sum of the masked inputs
(O(model) memory, never an individual input in the clear), and at the end rebuilds from the survivors'
revealed shares the self-mask seeds of those who sent inputs and the mask keys of those who dropped
after sharing, removes those masks, and returns the sum mod 2^k of the survivors' inputs.

Checks that let a round go on around a bad device: messages are verified (signature, round, stage,
sender in the round, shape) and refused with a ProtocolError naming the device; a rebuilt seed must
match the owner's signed commitment and a rebuilt mask key its advertised public key, so a false share
is detected, and the device that sent it is found by rebuilding from other subsets of the shares
(reported in `SecureSumResult.culprits`). A device that dropped is simply not in the sum.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edge_runtime.keys import public_hex
from edge_runtime.secagg import crypto, graph, shamir
from edge_runtime.secagg.client import PAIRWISE, pairwise_mask, self_mask
from edge_runtime.secagg.errors import PrivacyError, ProtocolError
from edge_runtime.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    Roster,
    RosterEntry,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    sign,
)

MAX_REBUILD_ATTEMPTS = 64  # random threshold-subsets tried to route around false shares
Check = Callable[[bytes], bool]  # whether a rebuilt 32-byte secret is the owner's


@dataclass
class SecureSumResult:
    residues: np.ndarray  # the survivors' summed inputs mod 2^ring_bits (uint32)
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]  # shared keys, then sent no masked input: their masks were removed
    culprits: dict[str, str] = field(default_factory=dict)  # device -> what it did (false share, ...)


class SecureSumServer:
    """One round's secure sum of `length` values in Z_{2^ring_bits} over the devices in `cohort`."""

    def __init__(
        self,
        ctx: crypto.RoundContext,
        cohort: Mapping[str, Ed25519PublicKey],
        signing_key: Ed25519PrivateKey,
        ring_bits: int,
        length: int,
        plan: graph.GraphPlan,
        graph_seed: bytes,
        name: str = "coordinator",
    ) -> None:
        if not 1 <= ring_bits <= 32:
            raise PrivacyError("FHAI-V601", f"ring bits must be 1..32, got {ring_bits}")
        self.ctx = ctx
        self.cohort = dict(cohort)
        self.ring_bits = ring_bits
        self.length = length
        self.plan = plan
        self.graph_seed = graph_seed
        self.name = name
        self._key = signing_key
        self._stage = "advertise"
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._neighbours: dict[str, list[str]] = {}
        self._points: dict[str, int] = {}
        self._sum = np.zeros(length, dtype=np.uint32)
        self._masked: list[str] = []
        self._revealed_seeds: dict[str, list[tuple[str, int]]] = {}
        self._revealed_keys: dict[str, list[tuple[str, int]]] = {}
        self._responded: set[str] = set()

    # -- helpers --------------------------------------------------------------------------------------

    def _expect(self, stage: str, sender: str) -> None:
        if self._stage != stage:
            raise ProtocolError("FHAI-V605", f"a {stage} message from {sender} arrived at stage {self._stage}", sender)

    def _verified(self, msg: AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse) -> str:
        key = self.cohort.get(msg.sender)
        if key is None:
            raise ProtocolError("FHAI-V605", f"{msg.sender} is not in this round's cohort", msg.sender)
        msg.verify(key, self.ctx)
        return msg.sender

    # -- round 0 --------------------------------------------------------------------------------------

    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        self._expect("advertise", msg.sender)
        sender = self._verified(msg)
        if sender in self._adverts:
            raise ProtocolError("FHAI-V605", f"{sender} advertised keys twice", sender)
        self._adverts[sender] = msg

    def roster(self) -> Roster:
        """Close round 0: the devices that advertised, their keys, and the graph."""
        self._expect("advertise", self.name)
        names = sorted(self._adverts)
        if len(names) < 2 or len(names) <= self.plan.threshold:
            raise ProtocolError(
                "FHAI-V606", f"only {len(names)} devices advertised keys; threshold {self.plan.threshold} needs more"
            )
        self._points = {name: i + 1 for i, name in enumerate(names)}
        self._neighbours = graph.neighbours(names, self.graph_seed, self.plan.degree)
        entries = tuple(
            RosterEntry(n, bytes.fromhex(public_hex(self.cohort[n])), a.enc_pk, a.mask_pk, a.signature)
            for n, a in ((n, self._adverts[n]) for n in names)
        )
        self._stage = "share"
        roster = Roster(self.ctx, self.name, self.graph_seed, self.plan.degree, self.plan.threshold, entries)
        return sign(roster, self._key)

    # -- round 1 --------------------------------------------------------------------------------------

    def receive_shares(self, msg: ShareKeys) -> None:
        self._expect("share", msg.sender)
        sender = self._verified(msg)
        if sender not in self._neighbours:
            raise ProtocolError("FHAI-V605", f"{sender} did not advertise keys in time", sender)
        if sender in self._shares:
            raise ProtocolError("FHAI-V605", f"{sender} sent its shares twice", sender)
        if {s.recipient for s in msg.shares} != set(self._neighbours[sender]):
            raise ProtocolError(
                "FHAI-V607", f"{sender} did not send exactly one share to each of its neighbours", sender
            )
        self._shares[sender] = msg

    def deliveries(self) -> dict[str, ShareDelivery]:
        """Close round 1: to each device that shared, the shares its neighbours sealed for it."""
        self._expect("share", self.name)
        out: dict[str, ShareDelivery] = {}
        for recipient in sorted(self._shares):
            sealed = tuple(
                s
                for sender in self._neighbours[recipient]
                if sender in self._shares
                for s in self._shares[sender].shares
                if s.recipient == recipient
            )
            out[recipient] = sign(ShareDelivery(self.ctx, self.name, recipient, sealed), self._key)
        self._stage = "mask"
        return out

    def masked_with(self, device: str) -> list[str]:
        """The neighbours whose pairwise masks `device` added: those that shared keys in round 1."""
        return [n for n in self._neighbours.get(device, []) if n in self._shares]

    # -- round 2 --------------------------------------------------------------------------------------

    def receive_masked(self, msg: MaskedInput) -> None:
        self._expect("mask", msg.sender)
        sender = self._verified(msg)
        if sender not in self._shares:
            raise ProtocolError("FHAI-V605", f"{sender} sent a masked input without sharing its keys", sender)
        if sender in self._masked:
            raise ProtocolError("FHAI-V605", f"{sender} sent a second masked input", sender)
        if (msg.ring_bits, msg.length) != (self.ring_bits, self.length):
            raise ProtocolError(
                "FHAI-V602",
                f"{sender}'s masked input is {msg.length} values in Z_2^{msg.ring_bits}, the round sums "
                f"{self.length} in Z_2^{self.ring_bits}",
                sender,
            )
        self._sum += msg.vector()
        self._masked.append(sender)

    def unmask_request(self) -> UnmaskRequest:
        """Close round 2: who survived (seeds to rebuild) and who dropped after sharing (keys to rebuild)."""
        self._expect("mask", self.name)
        survivors = tuple(sorted(self._masked))
        dropped = tuple(sorted(set(self._shares) - set(self._masked)))
        alive = set(survivors)
        for owner in self._shares:  # every secret to rebuild needs t live holders of its shares
            holders = sum(1 for n in self.masked_with(owner) if n in alive)
            if holders < self.plan.threshold:
                raise ProtocolError(
                    "FHAI-V606",
                    f"only {holders} of {owner}'s neighbours survived, threshold {self.plan.threshold}: the round "
                    "cannot be unmasked; repeat it (more devices dropped than the round was planned for)",
                )
        self._stage = "unmask"
        self._request = sign(UnmaskRequest(self.ctx, self.name, survivors, dropped), self._key)
        return self._request

    # -- round 3 --------------------------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        self._expect("unmask", msg.sender)
        sender = self._verified(msg)
        if sender not in self._masked:
            raise ProtocolError("FHAI-V605", f"{sender} is not a survivor of this round", sender)
        if sender in self._responded:
            raise ProtocolError("FHAI-V605", f"{sender} answered the unmask request twice", sender)
        held = set(self.masked_with(sender))
        survivors, dropped = set(self._request.survivors), set(self._request.dropped)
        for share in msg.seed_shares:
            if share.owner not in held or share.owner not in survivors:
                raise ProtocolError("FHAI-V607", f"{sender} revealed a seed share it cannot hold", sender)
        for share in msg.key_shares:
            if share.owner not in held or share.owner not in dropped:
                raise ProtocolError("FHAI-V607", f"{sender} revealed a key share it cannot hold", sender)
        self._responded.add(sender)
        for share in msg.seed_shares:
            self._revealed_seeds.setdefault(share.owner, []).append((sender, shamir.share_from_bytes(share.value)))
        for share in msg.key_shares:
            self._revealed_keys.setdefault(share.owner, []).append((sender, shamir.share_from_bytes(share.value)))

    def finish(self) -> SecureSumResult:
        """Rebuild the secrets, remove every mask that did not cancel, and return the sum mod 2^k."""
        self._expect("unmask", self.name)
        survivors, dropped = self._request.survivors, self._request.dropped
        culprits: dict[str, str] = {}
        total = self._sum.copy()
        for owner in survivors:
            seed = self._rebuild(owner, self._revealed_seeds.get(owner, []), self._seed_check(owner), culprits)
            total -= self_mask(seed, self.ctx, owner, self.length)
        for owner in dropped:
            raw = self._rebuild(owner, self._revealed_keys.get(owner, []), self._key_check(owner), culprits)
            mask_sk = X25519PrivateKey.from_private_bytes(raw)
            for neighbour in self.masked_with(owner):
                if neighbour in self._masked:  # its input carries its mask for the pair (neighbour, owner)
                    pk = self._adverts[neighbour].mask_pk
                    key = crypto.agree(mask_sk, pk, PAIRWISE, self.ctx, owner, neighbour)
                    total -= pairwise_mask(key, neighbour, owner, self.length)
        if self.ring_bits < 32:
            total &= np.uint32((1 << self.ring_bits) - 1)
        self._stage = "done"
        return SecureSumResult(total, tuple(survivors), tuple(dropped), culprits)

    def _seed_check(self, owner: str) -> Check:
        """A rebuilt self-mask seed is right when it matches the owner's signed commitment."""
        commitment = self._shares[owner].commitment
        return lambda seed: crypto.seed_commitment(seed, self.ctx, owner) == commitment

    def _key_check(self, owner: str) -> Check:
        """A rebuilt mask key is right when its public half is the one the owner advertised."""
        mask_pk = self._adverts[owner].mask_pk
        return lambda raw: crypto.public_bytes(X25519PrivateKey.from_private_bytes(raw)) == mask_pk

    def _rebuild(self, owner: str, shares: list[tuple[str, int]], check: Check, culprits: dict[str, str]) -> bytes:
        """The owner's 32-byte secret from revealed shares; false shares are routed around and reported."""
        t = self.plan.threshold
        points = [(self._points[holder], value) for holder, value in shares]
        if len(points) < t:
            raise ProtocolError(
                "FHAI-V606",
                f"only {len(points)} of the threshold {t} shares of {owner}'s secret were revealed: the round "
                "cannot be unmasked (too many dropouts during unmasking)",
            )
        secret = self._try(points[:t], check)
        if secret is not None:
            return secret
        # Some share among the first t is false: find a subset that rebuilds a secret passing the check.
        rng = random.Random(hashlib.sha256(owner.encode()).digest())
        for _ in range(MAX_REBUILD_ATTEMPTS):
            subset = rng.sample(points, t)
            secret = self._try(subset, check)
            if secret is not None:
                holders = {self._points[h]: h for h, _ in shares}
                for (x, _), ok in zip(points, shamir.consistent(points, subset), strict=True):
                    if not ok:
                        culprits[holders[x]] = f"revealed a false share of {owner}'s secret"
                return secret
        raise ProtocolError(
            "FHAI-V607",
            f"no {t} of the {len(points)} revealed shares of {owner}'s secret rebuild it: several devices sent "
            "false shares; the round's sum cannot be trusted",
        )

    @staticmethod
    def _try(points: list[tuple[int, int]], check: Check) -> bytes | None:
        value = shamir.lagrange_at(points, 0)
        if value >> (8 * shamir.SECRET_BYTES):
            return None
        secret = shamir.int_to_secret(value)
        return secret if check(secret) else None
