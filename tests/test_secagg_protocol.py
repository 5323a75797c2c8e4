"""SecAgg+ end to end in process: exact sums with dropouts, refused forgeries and replays, false shares found."""

from __future__ import annotations

import dataclasses
import os

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.privacy.secure_aggregate import SecureSumAccumulator, decode_secure_sum
from coordinator.privacy.secure_sum import SecureSumServer
from coordinator.privacy.simulation import run_secure_sum
from edge_runtime.secagg import crypto, graph, grid
from edge_runtime.secagg.client import SecAggClient
from edge_runtime.secagg.errors import PrivacyError, ProtocolError
from edge_runtime.secagg.grid import GridSpec
from edge_runtime.secagg.messages import (
    MaskedInput,
    RevealedShare,
    SealedShare,
    ShareDelivery,
    ShareKeys,
    UnmaskResponse,
    sign,
)
from edge_runtime.secagg.update import secure_update


def _inputs(n: int, length: int, ring_bits: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"site-{i:03d}": rng.integers(0, 2**ring_bits, length, dtype=np.uint64).astype(np.uint32) for i in range(n)}


def _plain_sum(inputs: dict[str, np.ndarray], who: tuple[str, ...], ring_bits: int) -> np.ndarray:
    return (sum(inputs[n].astype(np.uint64) for n in who) % 2**ring_bits).astype(np.uint32)


def test_graph_plan_meets_its_bounds() -> None:
    small = graph.choose_graph(10)
    assert small.complete and small.degree == 9 and small.threshold == 5
    big = graph.choose_graph(1000, corrupt_fraction=0.1, dropout_fraction=0.3)
    assert not big.complete and big.degree < 200
    from scipy import stats

    assert 1000 * stats.binom.sf(big.threshold - 1, big.degree, 0.1) <= 2**-40
    assert 1000 * stats.binom.sf(big.degree - big.threshold, big.degree, 0.3) <= 2**-20
    nbrs = graph.neighbours([f"d{i}" for i in range(50)], b"s" * 32, 8)
    assert all(len(v) == 8 for v in nbrs.values())
    assert all(a in nbrs[b] for a in nbrs for b in nbrs[a])  # symmetric
    with pytest.raises(PrivacyError, match="V601"):
        graph.choose_graph(4, corrupt_fraction=0.5, dropout_fraction=0.4)
    # Small cohorts: one device with the coordinator must never reach the threshold.
    assert graph.choose_graph(5).threshold == 2 and graph.choose_graph(3, dropout_fraction=0.0).threshold == 2
    for n, dropout in [(2, 0.0), (3, 0.3), (4, 0.3)]:
        with pytest.raises(PrivacyError, match="V601"):
            graph.choose_graph(n, dropout_fraction=dropout)


@pytest.mark.parametrize("n, sparse", [(10, False), (40, True)])
def test_thirty_percent_dropping_after_masking_is_recovered_exactly(n: int, sparse: bool) -> None:
    ring_bits = 19
    inputs = _inputs(n, 777, ring_bits)
    # sparse: degree 20 with t=5 keeps >= 8 live neighbours whichever 12 of 40 drop
    plan = graph.GraphPlan(20, 5, complete=False) if sparse else graph.choose_graph(n)
    dropped = sorted(inputs)[:: 10 // 3][: int(0.3 * n)]
    run = run_secure_sum(inputs, ring_bits, plan=plan, drop_after_shares=dropped)
    assert set(run.result.dropped) == set(dropped) and len(run.result.survivors) == n - len(dropped)
    assert (run.result.residues == _plain_sum(inputs, run.result.survivors, ring_bits)).all()


def test_dropouts_before_sharing_and_during_unmasking() -> None:
    ring_bits = 12
    inputs = _inputs(12, 100, ring_bits, seed=1)
    names = sorted(inputs)
    run = run_secure_sum(
        inputs, ring_bits, drop_before_shares=names[:1], drop_after_shares=names[1:3], drop_during_unmask=names[3:5]
    )
    assert names[0] not in run.result.survivors + run.result.dropped
    assert (run.result.residues == _plain_sum(inputs, run.result.survivors, ring_bits)).all()


def test_secure_model_update_round_decodes_to_the_mean() -> None:
    """Grid -> noise-free secure sum -> decode: equals the sum of the quantized integers exactly."""
    n, n_params = 10, 500
    spec = GridSpec(n_params, 1.0, 8, n, os.urandom(32))
    rng = np.random.default_rng(3)
    deltas = rng.standard_normal((n, n_params)) * 0.02
    updates = {f"s{i}": secure_update(d, spec, rng) for i, d in enumerate(deltas)}
    run = run_secure_sum({k: u.ring for k, u in updates.items()}, spec.ring_bits, drop_after_shares=["s3", "s7"])
    survivors = run.result.survivors
    total, measured = decode_secure_sum(run.result.residues, spec, len(survivors))
    ints = sum(grid.from_ring(updates[s].ring, spec.ring_bits) for s in survivors)
    assert np.allclose(total, grid.decode_sum(ints, spec))
    acc = SecureSumAccumulator(n_params)
    acc.add_sum(total, len(survivors))
    plain_mean = deltas[[int(s[1:]) for s in survivors]].mean(axis=0)
    err = np.linalg.norm(acc.result() - plain_mean)
    assert err**2 < 2 * grid.quantization_variance_bound(spec, len(survivors)) / len(survivors) ** 2
    assert measured["contributors"] == len(survivors)
    # the strategy steps with the unmasked mean as with a plain round's accumulator
    from coordinator.aggregation import FedAvg

    params = np.ones(n_params, np.float32)
    assert np.allclose(FedAvg().aggregate(params, acc), params + acc.result(), atol=1e-6)
    assert acc.count == len(survivors)


def test_garbage_input_is_detected_in_the_sum() -> None:
    n, n_params = 8, 300
    spec = GridSpec(n_params, 1.0, 8, n, os.urandom(32))
    rng = np.random.default_rng(4)
    inputs = {f"s{i}": secure_update(rng.standard_normal(n_params) * 0.01, spec, rng).ring for i in range(n)}
    inputs["s2"] = rng.integers(0, spec.modulus, spec.padded, dtype=np.uint64).astype(np.uint32)  # off the grid
    run = run_secure_sum(inputs, spec.ring_bits)
    with pytest.raises(PrivacyError, match="V608"):
        decode_secure_sum(run.result.residues, spec, n)


def test_false_revealed_share_is_found_and_the_sum_still_exact() -> None:
    ring_bits = 16
    inputs = _inputs(10, 64, ring_bits, seed=5)
    liar = "site-004"
    keys = {n: Ed25519PrivateKey.generate() for n in inputs}

    # Re-sign the liar's tampered response with its own key: a false share from a device, not a forgery.
    def tamper(stage: str, device: str, data: bytes) -> bytes:
        if stage != "unmask" or device != liar:
            return data
        msg = UnmaskResponse.decode(data)
        bad = tuple(
            RevealedShare(s.owner, (int.from_bytes(s.value, "big") ^ 1).to_bytes(66, "big")) for s in msg.seed_shares
        )
        return sign(dataclasses.replace(msg, seed_shares=bad), keys[liar]).encode()

    run = run_secure_sum(inputs, ring_bits, tamper=tamper, signing_keys=keys)
    assert run.result.culprits and set(run.result.culprits) == {liar}
    assert (run.result.residues == _plain_sum(inputs, run.result.survivors, ring_bits)).all()


# --- refusals: one device and coordinator driven by hand -------------------------------------------------


class Round:
    """A 4-device round driven step by step, so a test can inject a message."""

    def __init__(self, task: str = "sepsis", number: int = 7) -> None:
        self.ctx = crypto.RoundContext(task, number, os.urandom(16))
        self.names = [f"d{i}" for i in range(4)]
        self.keys = {n: Ed25519PrivateKey.generate() for n in self.names}
        self.coord_key = Ed25519PrivateKey.generate()
        self.server = SecureSumServer(
            self.ctx,
            {n: k.public_key() for n, k in self.keys.items()},
            self.coord_key,
            10,
            16,
            graph.GraphPlan(3, 2, complete=True),
            os.urandom(32),
        )
        self.clients = {n: SecAggClient(self.ctx, n, self.keys[n], self.coord_key.public_key()) for n in self.names}
        for n in self.names:
            self.server.receive_advertise(self.clients[n].advertise())
        self.roster = self.server.roster()
        self.shares = {n: self.clients[n].share_keys(self.roster) for n in self.names}
        for n in self.names:
            self.server.receive_shares(self.shares[n])
        self.deliveries = self.server.deliveries()


def test_forged_share_is_refused_by_its_recipient() -> None:
    r = Round()
    delivery = r.deliveries["d0"]
    first = delivery.shares[0]
    flipped = bytes([first.ciphertext[0] ^ 1]) + first.ciphertext[1:]
    forged = dataclasses.replace(
        delivery, shares=(SealedShare(first.sender, "d0", first.nonce, flipped), *delivery.shares[1:])
    )
    with pytest.raises(ProtocolError, match="V604") as info:
        r.clients["d0"].masked_input(sign(forged, r.coord_key), np.zeros(16, np.uint32), 10)
    assert info.value.culprit == first.sender


def test_share_from_another_round_is_refused() -> None:
    """A share sealed in round 6 of the same task, between the same devices' keys, does not open in round 7."""
    r = Round()
    other_ctx = crypto.RoundContext(r.ctx.task, r.ctx.round - 1, r.ctx.nonce)
    sender = r.clients["d1"]
    from edge_runtime.secagg.client import seal_shares

    d0 = next(e for e in r.roster.entries if e.device == "d0")
    old = seal_shares(other_ctx, "d1", sender._enc_sk, {"d0": (1, d0.enc_pk)}, {"d0": 5}, {"d0": 6})[0]
    delivery = r.deliveries["d0"]
    replaced = tuple(old if s.sender == "d1" else s for s in delivery.shares)
    with pytest.raises(ProtocolError, match="V604"):
        r.clients["d0"].masked_input(
            sign(dataclasses.replace(delivery, shares=replaced), r.coord_key), np.zeros(16, np.uint32), 10
        )


def test_replayed_masked_input_and_wrong_round_messages_are_refused() -> None:
    previous = Round(number=6)
    replay = previous.clients["d2"].masked_input(previous.deliveries["d2"], np.ones(16, np.uint32), 10)
    r = Round(number=7)
    with pytest.raises(ProtocolError, match="V604"):
        r.server.receive_masked(MaskedInput.decode(replay.encode()))
    # The old message's round number rewritten to 7: its signature no longer verifies.
    rewritten = MaskedInput(
        dataclasses.replace(replay.ctx, round=7, nonce=r.ctx.nonce), "d2", 10, 16, replay.packed, replay.signature
    )
    with pytest.raises(ProtocolError, match="V604"):
        r.server.receive_masked(rewritten)
    # A share message of another task is refused too.
    other_task = Round(task="readmission")
    with pytest.raises(ProtocolError):
        r.server.receive_shares(other_task.shares["d1"])
    # A device's own message signed by another device's key: refused.
    good = r.clients["d3"].masked_input(r.deliveries["d3"], np.ones(16, np.uint32), 10)
    forged = sign(dataclasses.replace(good, packed=bytes(len(good.packed))), r.keys["d1"])
    with pytest.raises(ProtocolError, match="V604"):
        r.server.receive_masked(forged)
    r.server.receive_masked(good)
    with pytest.raises(ProtocolError, match="V605"):
        r.server.receive_masked(good)  # twice


def test_device_refuses_to_reveal_both_secrets_of_one_peer() -> None:
    r = Round()
    for n in r.names:
        r.server.receive_masked(r.clients[n].masked_input(r.deliveries[n], np.zeros(16, np.uint32), 10))
    request = r.server.unmask_request()
    greedy = sign(dataclasses.replace(request, dropped=("d1",)), r.coord_key)  # d1 both survived and dropped
    with pytest.raises(ProtocolError, match="V605"):
        r.clients["d0"].unmask(greedy)


def test_malformed_messages_get_a_coded_error() -> None:
    for garbage in [b"", b"\x00" * 10, msgpack.packb([1, 2]), msgpack.packb([msgpack.packb([1, "share_keys"]), b"x"])]:
        with pytest.raises(ProtocolError, match="V603"):
            ShareKeys.decode(garbage)
    r = Round()
    good = r.shares["d0"].encode()
    with pytest.raises(ProtocolError, match="V603"):
        ShareDelivery.decode(good)  # right bytes, wrong message type
    with pytest.raises(ProtocolError, match="V603"):
        MaskedInput.decode(MaskedInput(r.ctx, "d0", 10, 16, b"\x00" * 3, b"\x00" * 64).encode())  # wrong length


def test_distributed_dp_round_sums_exactly_and_carries_the_planned_noise() -> None:
    """Plan -> devices add their discrete-Gaussian shares -> secure sum: exact, noise std as planned."""
    from coordinator.privacy.plan import plan_secure_round
    from edge_runtime.secagg import noise

    n, n_params = 12, 2000
    plan = plan_secure_round(n_params, 1.0, 8, n, noise_multiplier=1.5)
    spec = plan.grid
    assert plan.event is not None and plan.event.kind == "zcdp" and plan.noise_sigma > 0
    delta2 = noise.grid_sensitivity(1.0, spec.step, spec.padded)
    assert plan.event.rho == pytest.approx(delta2**2 / (2 * plan.graph.threshold * plan.noise_sigma**2), rel=1e-9)
    rng = np.random.default_rng(6)
    zeros = np.zeros(n_params)
    updates = {f"s{i:02d}": secure_update(zeros, spec, rng, plan.noise_sigma) for i in range(n)}
    run = run_secure_sum({k: u.ring for k, u in updates.items()}, spec.ring_bits, plan=plan.graph)
    centred = grid.from_ring(run.result.residues, spec.ring_bits)
    assert (centred == sum(grid.from_ring(u.ring, spec.ring_bits) for u in updates.values())).all()
    # all 12 survived: the summed noise has std sqrt(12)·sigma_dev >= z·Delta2 (sized for t survivors)
    assert centred.std() == pytest.approx(np.sqrt(n) * plan.noise_sigma, rel=0.05)
    assert np.sqrt(n) * plan.noise_sigma >= 1.5 * delta2
    assert grid.out_of_range(centred, spec, n) == 0


def test_too_many_dropouts_stop_the_round_before_unmasking() -> None:
    inputs = _inputs(6, 8, 8, seed=7)
    names = sorted(inputs)
    with pytest.raises(ProtocolError, match="V606"):
        # complete graph of 6 tolerates 30% = 2 dropouts (t = 3); 4 dropped leave 1 live neighbour
        run_secure_sum(inputs, 8, drop_after_shares=names[:4])


def test_corrupted_messages_raise_only_coded_errors() -> None:
    """Random byte flips and truncations of every message kind: decode + verify raise ProtocolError, nothing else."""
    r = Round()
    masked = r.clients["d0"].masked_input(r.deliveries["d0"], np.zeros(16, np.uint32), 10)
    samples = [r.roster, r.shares["d1"], r.deliveries["d2"], masked]
    rng = np.random.default_rng(9)
    for msg in samples:
        data = bytearray(msg.encode())
        for _ in range(150):
            bad = bytearray(data)
            for pos in rng.integers(0, len(bad), rng.integers(1, 4)):
                bad[pos] ^= int(rng.integers(1, 256))
            cut = bytes(bad[: rng.integers(1, len(bad) + 1)]) if rng.random() < 0.3 else bytes(bad)
            try:
                decoded = type(msg).decode(cut)
                decoded.verify(
                    r.coord_key.public_key() if msg.sender == "coordinator" else r.keys[msg.sender].public_key(), r.ctx
                )
            except ProtocolError:
                continue
            assert decoded.signed_bytes() == msg.signed_bytes()  # only a flip outside the signed bytes can pass


def test_a_restarted_coordinator_resumes_by_replaying_accepted_messages() -> None:
    """Resume design: the store keeps each accepted message's bytes; a fresh server replays them and goes on.

    Ed25519 signatures are deterministic, so the replayed roster, deliveries and request are the same bytes.
    """
    r = Round()
    inputs = {n: np.arange(16, dtype=np.uint32) * (i + 1) for i, n in enumerate(r.names)}
    masked = {n: r.clients[n].masked_input(r.deliveries[n], inputs[n], 10) for n in r.names}

    fresh = SecureSumServer(
        r.ctx, {n: k.public_key() for n, k in r.keys.items()}, r.coord_key, 10, 16, r.server.plan, r.server.graph_seed
    )
    for entry in r.roster.entries:  # the stored AdvertiseKeys, as the roster relays them with their signatures
        fresh.receive_advertise(entry.advertisement(r.ctx))
    assert fresh.roster().encode() == r.roster.encode()
    for n in r.names:
        fresh.receive_shares(ShareKeys.decode(r.shares[n].encode()))
    assert {k: v.encode() for k, v in fresh.deliveries().items()} == {k: v.encode() for k, v in r.deliveries.items()}
    for n in r.names[:3]:  # d3 drops after sharing
        fresh.receive_masked(MaskedInput.decode(masked[n].encode()))
    request = fresh.unmask_request()
    for n in request.survivors:
        fresh.receive_unmask(r.clients[n].unmask(request))
    result = fresh.finish()
    assert result.dropped == ("d3",)
    assert (result.residues == _plain_sum(inputs, result.survivors, 10)).all()
