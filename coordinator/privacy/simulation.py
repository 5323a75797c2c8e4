"""An in-process run of the four secure-aggregation rounds: devices and coordinator exchange the real
encoded messages (bytes), with dropouts at chosen points. Used by the tests and bench/privacy.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
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


@dataclass
class SimulatedRound:
    result: SecureSumResult
    sent_bytes: dict[str, int]  # device -> bytes it sent over the four rounds
    received_bytes: dict[str, int]  # device -> bytes the coordinator sent it
    coordinator_seconds: float  # time spent in the coordinator's state machine (decode + verify + sum + unmask)
    device_seconds: dict[str, float] = field(default_factory=dict)


def run_secure_sum(
    inputs: Mapping[str, np.ndarray],
    ring_bits: int,
    *,
    plan: graph.GraphPlan | None = None,
    drop_before_shares: Iterable[str] = (),
    drop_after_shares: Iterable[str] = (),
    drop_during_unmask: Iterable[str] = (),
    tamper: Callable[[str, str, bytes], bytes] | None = None,
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
    sent = dict.fromkeys(names, 0)
    received = dict.fromkeys(names, 0)
    device_seconds = dict.fromkeys(names, 0.0)
    server_seconds = 0.0
    tamper = tamper or (lambda stage, device, data: data)

    def device(n: str, step: Callable[[], bytes]) -> bytes:
        t0 = time.perf_counter()
        data = step()
        device_seconds[n] += time.perf_counter() - t0
        sent[n] += len(data)
        return data

    def coordinator(step: Callable[[], object]) -> object:
        nonlocal server_seconds
        t0 = time.perf_counter()
        out = step()
        server_seconds += time.perf_counter() - t0
        return out

    before, after, during = set(drop_before_shares), set(drop_after_shares), set(drop_during_unmask)
    for n in names:
        data = tamper("advertise", n, device(n, lambda n=n: clients[n].advertise().encode()))
        coordinator(lambda d=data: server.receive_advertise(AdvertiseKeys.decode(d)))
    roster = coordinator(lambda: server.roster().encode())
    assert isinstance(roster, bytes)
    for n in names:
        received[n] += len(roster)
        if n in before:
            continue
        data = tamper("share", n, device(n, lambda n=n: clients[n].share_keys(Roster.decode(roster)).encode()))
        coordinator(lambda d=data: server.receive_shares(ShareKeys.decode(d)))
    deliveries = coordinator(lambda: {k: v.encode() for k, v in server.deliveries().items()})
    assert isinstance(deliveries, dict)
    for n, delivery in deliveries.items():
        received[n] += len(delivery)
        if n in after:
            continue
        data = tamper(
            "mask",
            n,
            device(
                n, lambda n=n, d=delivery: clients[n].masked_input(ShareDelivery.decode(d), inputs[n], ring_bits).encode()
            ),
        )
        coordinator(lambda d=data: server.receive_masked(MaskedInput.decode(d)))
    request = coordinator(lambda: server.unmask_request().encode())
    assert isinstance(request, bytes)
    for n in UnmaskRequest.decode(request).survivors:
        received[n] += len(request)
        if n in during:
            continue
        data = tamper("unmask", n, device(n, lambda n=n: clients[n].unmask(UnmaskRequest.decode(request)).encode()))
        coordinator(lambda d=data: server.receive_unmask(UnmaskResponse.decode(d)))
    result = coordinator(server.finish)
    assert isinstance(result, SecureSumResult)
    return SimulatedRound(result, sent, received, server_seconds, device_seconds)
