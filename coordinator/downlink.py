"""The coordinator's side of the quantized downlink: the reference copy the devices hold, and its frames.

`Downlink.advance(exact, round)` is called with every committed global model. At `bits: 32` the reference
is the exact model and every round's live frame is a float32 keyframe (the plain path). At 8 or 4 bits
it sends `codec(exact - reference)` and moves the reference by what that patch decodes to
(`edge_runtime.downlink.apply_patch`, the devices' own function), so the reference trails the exact model
by less than one quantization step and never drifts: error feedback on the server. Every
`keyframe_every` rounds the reference is also kept whole as the retained keyframe, and the chain of
patches since then is retained beside it, for devices that join late or come back from a restart.

The stochastic rounding is seeded by (task seed, round), so a restarted coordinator that replays the
committed checkpoints (`replay`) rebuilds the same reference bit for bit without storing it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_runtime import codec
from edge_runtime.downlink import ChainEntry, apply_patch, frame_header, standardizer_body
from edge_runtime.messages import model_body
from edge_runtime.model import Model

_STREAM = 0x646C  # "dl": the downlink's rounding draws from its own stream, apart from any other use of the seed


class DownlinkSettings(BaseModel):
    """How the global model travels to the devices (task YAML `downlink:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[4, 8, 32] = 8  # 32: the whole float32 model every round
    block_size: int = Field(codec.DEFAULT_BLOCK_SIZE, ge=codec.MIN_BLOCK_SIZE, le=codec.MAX_BLOCK_SIZE)
    compress: bool = True
    keyframe_every: int = Field(10, ge=1, le=10_000)  # rounds between retained keyframes


@dataclass(frozen=True)
class OutFrame:
    """A model frame to sign and publish (retained) on `channel`: live, keyframe or chain."""

    channel: Literal["live", "key", "chain"]
    header: dict[str, object]
    body: bytes

    @property
    def ident(self) -> str:
        """Changes exactly when the frame's content does: republishing an unchanged frame wastes the uplink."""
        return f"{self.header['round']}/{self.header['model_version']}"


@dataclass
class Downlink:
    settings: DownlinkSettings
    task: str
    seed: int
    reference: Model | None = None
    previous: Model | None = None  # the reference one round before: a late export may ship it
    round: int = -1
    keyframe: tuple[int, Model] | None = None
    chain: list[tuple[ChainEntry, bytes]] = field(default_factory=list)
    live: OutFrame | None = None

    def advance(self, exact: Model, round_no: int) -> Model:
        """Move the reference copy towards `exact` (committed in `round_no`); returns the new reference."""
        ref = self.previous = self.reference
        if self.settings.bits == 32:
            self.reference = exact.copy()
            self.live = OutFrame("live", frame_header(self.task, round_no, exact, "full"), model_body(exact))
            self._keyframe(round_no)
            return self.reference
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, round_no, _STREAM])
        restart = ref is None or ref.spec != exact.spec or _standardizer_changed(ref, exact)
        start = np.zeros_like(exact.params) if restart or ref is None else ref.params
        body = codec.encode(
            (exact.params - start).astype(np.float32),
            self.settings.bits,
            rng,
            self.settings.block_size,
            self.settings.compress,
        )
        if restart:
            body = standardizer_body(exact.standardizer) + body
        new = apply_patch(None if restart else ref, exact.spec, body)
        base = None if restart or ref is None else ref.version()
        self.live = OutFrame("live", frame_header(self.task, round_no, new, "delta", base_version=base), body)
        self.reference = new
        if restart or round_no % self.settings.keyframe_every == 0:
            self._keyframe(round_no)
        else:
            assert base is not None
            self.chain.append(
                (ChainEntry(round=round_no, base_version=base, model_version=new.version(), length=len(body)), body)
            )
        self.round = round_no
        return new

    def _keyframe(self, round_no: int) -> None:
        assert self.reference is not None
        self.keyframe = (round_no, self.reference)
        self.chain = []
        self.round = round_no

    def frames(self) -> list[OutFrame]:
        """What to publish for the current reference: the live frame, and (quantized) keyframe and chain."""
        if self.live is None or self.reference is None or self.keyframe is None:
            return []
        if self.settings.bits == 32:
            return [self.live]
        key_round, key = self.keyframe
        key_frame = OutFrame("key", frame_header(self.task, key_round, key, "full"), model_body(key))
        chain_header = frame_header(
            self.task,
            self.round,
            self.reference,
            "chain",
            base_version=key.version(),
            keyframe_round=key_round,
            entries=[e.model_dump() for e, _ in self.chain],
        )
        chain_frame = OutFrame("chain", chain_header, b"".join(b for _, b in self.chain))
        return [self.live, key_frame, chain_frame]

    def replay(self, committed: Iterable[tuple[int, Model]]) -> None:
        """Rebuild the reference after a restart from the committed models, in round order."""
        for round_no, model in committed:
            self.advance(model, round_no)


def _standardizer_changed(a: Model, b: Model) -> bool:
    return not (
        np.array_equal(a.standardizer.mean, b.standardizer.mean)
        and np.array_equal(a.standardizer.scale, b.standardizer.scale)
    )
