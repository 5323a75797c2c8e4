"""An in-process run of the four secure-aggregation rounds: devices and coordinator exchange the real
encoded messages (bytes), with dropouts at chosen points. Used by the tests and bench/privacy.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.privacy.secure_sum import SecureSumResult, SecureSumServer
from edge_runtime.secagg import crypto, graph
from edge_runtime.secagg.client import SecAggClient
from edge_runtime.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

Tamper = Callable[[str, str, bytes], bytes]


@dataclass
class SimulatedRound:
    result: SecureSumResult
    sent_bytes: dict[str, int]  # device -> bytes it sent over the four rounds
    received_bytes: dict[str, int]  # device -> bytes the coordinator sent it
    coordinator_seconds: float = 0.0  # in the coordinator's state machine (decode, verify, sum, unmask)
    device_seconds: dict[str, float] = field(default_factory=dict)


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def run(self, who: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[who] = self.seconds.get(who, 0.0) + time.perf_counter() - t0


def run_secure_sum(
    inputs: Mapping[str, np.ndarray],
    ring_bits: int,
    *,
    plan: graph.GraphPlan | None = None,
    drop_before_shares: Iterable[str] = (),
    drop_after_shares: Iterable[str] = (),
    drop_during_unmask: Iterable[str] = (),
    tamper: Tamper | None = None,
    ctx: crypto.RoundContext | None = None,
    signing_keys: Mapping[str, Ed25519PrivateKey] | None = None,
) -> SimulatedRound:
    """One secure sum of `inputs` (device -> uint32 ring vector) with dropouts at the named stages.

    `tamper(stage, device, encoded)` may rewrite a device's encoded message before the coordinator
    reads it (to test refusals); it does not change what the device believes it sent.
    """
    names = sorted(inputs)
    length = len(next(iter(inputs.values())))
    ctx = ctx or crypto.RoundContext("task", 1, os.urandom(crypto.ROUND_NONCE_BYTES))
    plan = plan or graph.choose_graph(len(names))
    keys = dict(signing_keys) if signing_keys else {n: Ed25519PrivateKey.generate() for n in names}
    coordinator_key = Ed25519PrivateKey.generate()
    server = SecureSumServer(
        ctx, {n: k.public_key() for n, k in keys.items()}, coordinator_key, ring_bits, length, plan, os.urandom(32)
    )
    clients = {n: SecAggClient(ctx, n, keys[n], coordinator_key.public_key()) for n in names}
    run = SimulatedRound(
        SecureSumResult(np.zeros(0, np.uint32), (), ()), dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    )
    clock = _Clock()
    edit: Tamper = tamper or (lambda stage, device, data: data)
    coordinator = "coordinator"

    def send(stage: str, device: str, data: bytes) -> bytes:
        run.sent_bytes[device] += len(data)
        return edit(stage, device, data)

    before, after, during = set(drop_before_shares), set(drop_after_shares), set(drop_during_unmask)
    for n in names:
        with clock.run(n):
            data = send("advertise", n, clients[n].advertise().encode())
        with clock.run(coordinator):
            server.receive_advertise(AdvertiseKeys.decode(data))
    with clock.run(coordinator):
        roster = server.roster().encode()
    for n in names:
        run.received_bytes[n] += len(roster)
        if n in before:
            continue
        with clock.run(n):
            data = send("share", n, clients[n].share_keys(Roster.decode(roster)).encode())
        with clock.run(coordinator):
            server.receive_shares(ShareKeys.decode(data))
    with clock.run(coordinator):
        deliveries = {k: v.encode() for k, v in server.deliveries().items()}
    for n, delivery in deliveries.items():
        run.received_bytes[n] += len(delivery)
        if n in after:
            continue
        with clock.run(n):
            masked = clients[n].masked_input(ShareDelivery.decode(delivery), inputs[n], ring_bits)
            data = send("mask", n, masked.encode())
        with clock.run(coordinator):
            server.receive_masked(MaskedInput.decode(data))
    with clock.run(coordinator):
        request = server.unmask_request().encode()
    for n in UnmaskRequest.decode(request).survivors:
        run.received_bytes[n] += len(request)
        if n in during:
            continue
        with clock.run(n):
            data = send("unmask", n, clients[n].unmask(UnmaskRequest.decode(request)).encode())
        with clock.run(coordinator):
            server.receive_unmask(UnmaskResponse.decode(data))
    with clock.run(coordinator):
        run.result = server.finish()
    run.coordinator_seconds = clock.seconds.pop(coordinator)
    run.device_seconds = clock.seconds
    return run
