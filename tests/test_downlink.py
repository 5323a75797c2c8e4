"""The quantized downlink: the coordinator's reference copy, its frames, and a device following them."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.downlink import Downlink, DownlinkSettings, OutFrame
from edge_runtime import codec, wire
from edge_runtime.downlink import DownlinkError, Held, ModelFollower, apply_patch
from edge_runtime.model import Model, ModelSpec, Standardizer

SPEC = ModelSpec(12, (40,), 2)
KEY = Ed25519PrivateKey.generate()


def exact_models(rounds: int, seed: int = 0, decay: bool = True) -> list[Model]:
    """A global model moving like training does: round r's change (shrinking unless `decay` is off), plus a drift."""
    rng = np.random.default_rng(seed)
    std = Standardizer(rng.normal(size=12).astype(np.float32), rng.uniform(0.5, 2, 12).astype(np.float32))
    model = Model.create(SPEC, seed, std)
    out = [model]
    for r in range(1, rounds + 1):
        step = rng.normal(0, 0.05 / (np.sqrt(r) if decay else 1), model.params.size) + 0.002
        model = Model(SPEC, (model.params + step).astype(np.float32), std)
        out.append(model)
    return out


def frame(out: OutFrame) -> wire.Frame:
    """Signed and decoded as a device would: the header's version is under the coordinator's signature."""
    data = wire.encode_frame("model", wire.COORDINATOR, out.header, out.body, KEY)
    return wire.decode_frame(data, lambda s: KEY.public_key() if s == wire.COORDINATOR else None)


def frames_by_channel(dl: Downlink) -> dict[str, wire.Frame]:
    return {out.channel: frame(out) for out in dl.frames()}


def test_devices_hold_the_reference_bit_for_bit_and_it_tracks_the_exact_model() -> None:
    dl = Downlink(DownlinkSettings(bits=8, keyframe_every=4), "t", seed=3)
    device = ModelFollower()
    models = exact_models(12)
    for r, exact in enumerate(models):
        ref = dl.advance(exact, r)
        assert device.on_live(frames_by_channel(dl)["live"])
        assert device.model is not None and device.model.version() == ref.version()
        np.testing.assert_array_equal(device.model.params, ref.params)
        np.testing.assert_array_equal(device.model.standardizer.scale, exact.standardizer.scale)
        assert device.held is not None and device.held.round == r


def test_error_feedback_keeps_the_copy_from_drifting_where_sending_each_change_alone_would() -> None:
    """Quantizing each round's change of the exact model and summing accumulates rounding errors like a random
    walk; patching towards the exact model from the reference keeps the gap at one step."""
    models = exact_models(60, seed=1, decay=False)
    dl = Downlink(DownlinkSettings(bits=4, keyframe_every=1000), "t", seed=0)
    naive = models[0].params.copy()
    gaps_ef, gaps_naive = [], []
    for r, exact in enumerate(models):
        ref = dl.advance(exact, r)
        if r:
            change = (exact.params - models[r - 1].params).astype(np.float32)
            naive = naive + codec.decode(codec.encode(change, 4, np.random.default_rng(r)))
        gaps_ef.append(float(np.linalg.norm(exact.params - ref.params)))
        gaps_naive.append(float(np.linalg.norm(exact.params - naive)))
    assert max(gaps_ef[40:]) < 0.5 * np.mean(gaps_naive[40:])
    assert np.mean(gaps_naive[50:]) > 2 * np.mean(gaps_naive[5:10])  # the naive copy does drift
    assert np.mean(gaps_ef[50:]) < 1.5 * np.mean(gaps_ef[5:10])  # the reference does not


def test_the_reference_is_within_one_quantization_step_of_the_exact_model() -> None:
    models = exact_models(10, seed=2)
    dl = Downlink(DownlinkSettings(bits=8), "t", seed=5)
    ref = None
    for r, exact in enumerate(models):
        target = exact.params - (ref.params if ref is not None else 0)
        bound = np.repeat(codec.max_block_error(target.astype(np.float32), 8), 256)[: exact.params.size]
        ref = dl.advance(exact, r)
        assert (np.abs(exact.params - ref.params) <= bound * (1 + 1e-6)).all()


def test_a_late_device_catches_up_from_the_keyframe_and_chain_in_any_order() -> None:
    dl = Downlink(DownlinkSettings(bits=8, keyframe_every=5), "t", seed=1)
    for r, exact in enumerate(exact_models(8)):
        dl.advance(exact, r)
    assert dl.keyframe is not None and dl.keyframe[0] == 5 and len(dl.chain) == 3
    frames = frames_by_channel(dl)
    for order in (("live", "chain", "key"), ("key", "live", "chain"), ("chain", "key", "live")):
        device = ModelFollower()
        feed = {"live": device.on_live, "key": device.on_keyframe, "chain": device.on_chain}
        for channel in order:
            feed[channel](frames[channel])
        assert device.model is not None and device.model.version() == dl.reference.version(), order  # type: ignore[union-attr]
        assert not device.needs_sync


def test_a_resuming_device_patches_forward_from_the_chain_without_the_keyframe() -> None:
    dl = Downlink(DownlinkSettings(bits=8, keyframe_every=10), "t", seed=1)
    held: Held | None = None
    for r, exact in enumerate(exact_models(7)):
        ref = dl.advance(exact, r)
        if r == 3:
            held = Held(ref.copy(), r)  # the device stopped after round 3
    device = ModelFollower(held)
    frames = frames_by_channel(dl)
    device.on_live(frames["live"])
    assert device.needs_sync and not device.chain_fell_short
    device.on_chain(frames["chain"])
    assert not device.needs_sync and device.model.version() == dl.reference.version()  # type: ignore[union-attr]


def test_a_copy_older_than_the_keyframe_needs_the_keyframe() -> None:
    dl = Downlink(DownlinkSettings(bits=8, keyframe_every=4), "t", seed=1)
    held: Held | None = None
    for r, exact in enumerate(exact_models(6)):
        ref = dl.advance(exact, r)
        if r == 2:
            held = Held(ref.copy(), r)
    device = ModelFollower(held)
    frames = frames_by_channel(dl)
    device.on_live(frames["live"])
    device.on_chain(frames["chain"])
    assert device.chain_fell_short
    device.on_keyframe(frames["key"])
    assert not device.needs_sync and device.model.version() == dl.reference.version()  # type: ignore[union-attr]


def test_float32_downlink_sends_the_exact_model_whole() -> None:
    dl = Downlink(DownlinkSettings(bits=32), "t", seed=0)
    device = ModelFollower()
    for r, exact in enumerate(exact_models(3)):
        assert dl.advance(exact, r).version() == exact.version()
        outs = dl.frames()
        assert [o.channel for o in outs] == ["live"] and outs[0].header["encoding"] == "full"
        device.on_live(frame(outs[0]))
        assert device.model is not None and device.model.version() == exact.version()


def test_a_restarted_coordinator_replays_to_the_same_reference() -> None:
    models = list(enumerate(exact_models(9)))
    a = Downlink(DownlinkSettings(bits=4, keyframe_every=3), "t", seed=11)
    for r, m in models:
        a.advance(m, r)
    b = Downlink(DownlinkSettings(bits=4, keyframe_every=3), "t", seed=11)
    b.replay(models)
    assert a.reference is not None and b.reference is not None
    assert a.reference.version() == b.reference.version()
    assert [o.ident for o in a.frames()] == [o.ident for o in b.frames()]


def test_a_patch_that_produces_another_model_than_announced_is_refused() -> None:
    dl = Downlink(DownlinkSettings(bits=8), "t", seed=0)
    models = exact_models(2)
    dl.advance(models[0], 0)
    device = ModelFollower()
    device.on_live(frames_by_channel(dl)["live"])
    dl.advance(models[1], 1)
    live = dl.frames()[0]
    forged = OutFrame("live", {**live.header, "model_version": "0" * 16}, live.body)
    with pytest.raises(DownlinkError) as err:
        device.on_live(frame(forged))
    assert err.value.code == "FHAI-L804"
    assert device.held is not None and device.held.round == 0 and device.needs_sync
    # The refused patch is dropped, not retried forever: the retained chain brings the device up to date.
    assert device.on_chain(frames_by_channel(dl)["chain"])
    assert device.model.version() == dl.reference.version() and not device.needs_sync  # type: ignore[union-attr]
    # Another architecture's patch, and a corrupt body, are refused with their own codes.
    with pytest.raises(DownlinkError) as err:
        apply_patch(device.model, ModelSpec(12, (41,), 2), live.body)
    assert err.value.code == "FHAI-L802"
    with pytest.raises(DownlinkError) as err:
        apply_patch(device.model, SPEC, live.body[:-3])
    assert err.value.code == "FHAI-L803"


def test_a_chain_whose_entries_do_not_tile_its_body_is_refused() -> None:
    dl = Downlink(DownlinkSettings(bits=8, keyframe_every=10), "t", seed=0)
    for r, m in enumerate(exact_models(3)):
        dl.advance(m, r)
    chain = next(o for o in dl.frames() if o.channel == "chain")
    device = ModelFollower()
    with pytest.raises(DownlinkError) as err:
        device.on_chain(frame(OutFrame("chain", chain.header, chain.body + b"x")))
    assert err.value.code == "FHAI-L805"
