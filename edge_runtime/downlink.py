"""The quantized downlink: patches that move a device's copy of the global model, and the device's side of it.

The coordinator keeps two models: the exact one its strategy updates, and the *reference copy*, which is
what every device holds bit for bit. Each round it sends `codec(exact - reference)` and both sides add
the decoded patch to the reference with `apply_patch`, the same float32 arithmetic, so the copies stay
identical; what the quantizer dropped stays in `exact - reference` and rides along in the next patch
(server-side error feedback). Frames are kind "model" (see docs/protocol.md):

- `encoding="full"`: body = `model_body` (float32 params | mean | scale). A keyframe: the float32 path
  (`downlink.bits: 32`) and the retained keyframe a late device starts from.
- `encoding="delta"`: body = a codec body of the parameter change since `base_version`. With no base
  (`base_version` None: the task's first model) the body starts with the standardizer's mean | scale,
  float32, and the patch applies to zero parameters.
- `encoding="chain"`: every delta since the keyframe `base_version`, bodies back to back; `entries` says
  where each ends and what it produces.

Every frame names the version the patch must produce (`Model.version()`: a hash of spec, parameters and
standardizer) in its signed header, and the device refuses a result that hashes otherwise.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_runtime import codec
from edge_runtime.errors import EdgeError
from edge_runtime.messages import ModelHeader, model_from_body, parse_header
from edge_runtime.model import Model, ModelSpec, Standardizer
from edge_runtime.wire import Frame, WireError

Encoding = Literal["full", "delta", "chain"]
KEEP_RECENT = 3  # models a device keeps in memory: enough to rebuild the export of the previous round
MAX_CHAIN = 10_000


class DownlinkError(EdgeError):
    """A model patch that does not apply to what this device holds, or produces another model than announced."""


class ChainEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    base_version: str
    model_version: str
    length: int = Field(gt=0)


class ModelFrameHeader(ModelHeader):
    """The header of every model frame; `round` is the round whose commit produced `model_version`."""

    encoding: Encoding = "full"
    base_version: str | None = None
    keyframe_round: int | None = Field(None, ge=0)
    entries: list[ChainEntry] = Field(default_factory=list, max_length=MAX_CHAIN)


def standardizer_body(standardizer: Standardizer) -> bytes:
    return b"".join(np.ascontiguousarray(a, "<f4").tobytes() for a in (standardizer.mean, standardizer.scale))


def apply_patch(base: Model | None, spec: ModelSpec, body: bytes, max_bytes: int = codec.DEFAULT_MAX_BYTES) -> Model:
    """The model a delta body produces from `base` (None: zero parameters, standardizer in the body).

    The coordinator computes its reference copy with this very function, so device and coordinator
    add the same float32 vectors in the same order and end with identical bits.
    """
    n = spec.layout().size
    if base is None:
        head = 8 * spec.n_features
        if len(body) < head:
            raise DownlinkError("FHAI-L801", f"a first model patch needs {head} bytes of standardizer, got {len(body)}")
        std = np.frombuffer(body[:head], "<f4").astype(np.float32)
        if not (np.isfinite(std).all() and (std[spec.n_features :] > 0).all()):
            raise DownlinkError("FHAI-L801", "the patch's standardizer holds non-finite or non-positive scales")
        standardizer = Standardizer(std[: spec.n_features].copy(), std[spec.n_features :].copy())
        start = np.zeros(n, np.float32)
        body = body[head:]
    else:
        if base.spec != spec:
            raise DownlinkError("FHAI-L802", f"patch for model {spec} cannot apply to the held {base.spec}")
        standardizer, start = base.standardizer, base.params
    try:
        step = codec.decode(body, expected_n=n, max_bytes=max_bytes)
    except codec.CodecError as exc:
        raise DownlinkError("FHAI-L803", f"model patch does not decode: {exc.message}") from exc
    params = start + step
    if not np.isfinite(params).all():
        raise DownlinkError("FHAI-L803", "model patch produces non-finite parameters")
    return Model(spec, params, Standardizer(standardizer.mean.copy(), standardizer.scale.copy()))


def _checked(model: Model, version: str, what: str) -> Model:
    if model.version() != version:
        raise DownlinkError(
            "FHAI-L804",
            f"{what} produces model {model.version()}, the coordinator's reference is {version}: "
            "this device's copy is not the coordinator's; it will fetch the keyframe",
        )
    return model


def split_chain(header: ModelFrameHeader, body: bytes) -> list[tuple[ChainEntry, bytes]]:
    """The (entry, delta body) pairs of a chain frame, after checking that they tile the body and link up."""
    if sum(e.length for e in header.entries) != len(body):
        raise DownlinkError("FHAI-L805", "chain entries do not add up to the chain frame's body")
    out, at, base = [], 0, header.base_version
    for e in header.entries:
        if e.base_version != base:
            raise DownlinkError("FHAI-L805", f"chain entry of round {e.round} does not follow model {base}")
        out.append((e, body[at : at + e.length]))
        at, base = at + e.length, e.model_version
    return out


@dataclass
class Held:
    model: Model
    round: int


class ModelFollower:
    """The device's copy of the global model, kept in step by the frames of the task's model topics.

    Live frames (the `model` topic) move it round by round. When one does not apply (the device joined
    late, restarted from an older copy, or missed a round) the follower says it `needs_sync`; the agent
    then subscribes to the retained keyframe and chain topics and feeds what arrives to `on_keyframe` and
    `on_chain` until the follower reaches the newest model it has heard of.
    """

    def __init__(self, held: Held | None = None) -> None:
        self.held = held
        self.recent: OrderedDict[str, Model] = OrderedDict()
        if held is not None:
            self._remember(held.model)
        self.newest_round = held.round if held else -1
        self._pending: tuple[ModelFrameHeader, bytes] | None = None  # a live delta waiting for its base
        self._keyframe: Held | None = None
        self._chain: tuple[ModelFrameHeader, bytes] | None = None

    @property
    def model(self) -> Model | None:
        return self.held.model if self.held else None

    @property
    def needs_sync(self) -> bool:
        """Behind the newest model heard of, and no live patch alone will bring it there."""
        return self.newest_round > (self.held.round if self.held is not None else -1)

    @property
    def chain_fell_short(self) -> bool:
        """The retained chain came and did not reach the newest model: the keyframe is needed."""
        return self._chain is not None and self.needs_sync

    def _remember(self, model: Model) -> None:
        self.recent[model.version()] = model
        self.recent.move_to_end(model.version())
        while len(self.recent) > KEEP_RECENT:
            self.recent.popitem(last=False)

    def _adopt(self, model: Model, round_no: int) -> bool:
        if self.held is not None and round_no <= self.held.round:
            return False
        self.held = Held(model, round_no)
        self._remember(model)
        return True

    def on_live(self, frame: Frame) -> bool:
        """A frame from the live model topic; True when the held model changed."""
        header = parse_header(frame, ModelFrameHeader)
        self.newest_round = max(self.newest_round, header.round)
        if self.held is not None and self.held.model.version() == header.model_version:
            return False
        if header.encoding == "full":
            return self._adopt(
                _checked(_full_model(header, frame.body), header.model_version, "keyframe"), header.round
            )
        if header.encoding != "delta":
            raise WireError("FHAI-L806", f"a {header.encoding} frame on the live model topic")
        self._pending = (header, frame.body)
        return self._resolve()

    def on_keyframe(self, frame: Frame) -> bool:
        header = parse_header(frame, ModelFrameHeader)
        if header.encoding != "full":
            raise WireError("FHAI-L806", f"a {header.encoding} frame on the keyframe topic")
        model = _checked(_full_model(header, frame.body), header.model_version, "keyframe")
        self.newest_round = max(self.newest_round, header.round)
        self._keyframe = Held(model, header.round)
        return self._resolve()

    def on_chain(self, frame: Frame) -> bool:
        header = parse_header(frame, ModelFrameHeader)
        if header.encoding != "chain" or header.base_version is None:
            raise WireError("FHAI-L806", f"a {header.encoding} frame on the chain topic")
        split_chain(header, frame.body)
        self.newest_round = max(self.newest_round, header.round)
        self._chain = (header, frame.body)
        return self._resolve()

    def _resolve(self) -> bool:
        """Move as far forward as the held copy, keyframe, chain and pending live delta allow.

        A chain or live patch that fails is dropped before the error propagates, so one bad frame cannot
        make every later frame fail too; the next retained copy or live patch is tried afresh.
        """
        changed = False
        if self._keyframe is not None and (self.held is None or self.held.round < self._keyframe.round):
            changed |= self._adopt(self._keyframe.model, self._keyframe.round)
        if self._chain is not None and self.held is not None:
            header, body = self._chain
            try:
                spec = ModelSpec.from_dict(header.spec)
                for entry, delta in split_chain(header, body):
                    if entry.round > self.held.round and entry.base_version == self.held.model.version():
                        model = _checked(apply_patch(self.held.model, spec, delta), entry.model_version, "chain entry")
                        changed |= self._adopt(model, entry.round)
            except EdgeError:
                self._chain = None
                raise
        if self._pending is not None:
            header, body = self._pending
            if self.held is not None and self.held.round >= header.round:
                self._pending = None
            elif header.base_version is None or (
                self.held is not None and header.base_version == self.held.model.version()
            ):
                self._pending = None
                base = None if header.base_version is None else self.held.model if self.held else None
                spec = ModelSpec.from_dict(header.spec)
                model = _checked(apply_patch(base, spec, body), header.model_version, "model patch")
                changed |= self._adopt(model, header.round)
        if not self.needs_sync:
            self._keyframe = self._chain = None
        return changed


def _full_model(header: ModelFrameHeader, body: bytes) -> Model:
    return model_from_body(header.spec, body)


def frame_header(task: str, round_no: int, model: Model, encoding: Encoding, **fields: Any) -> dict[str, Any]:
    """The kind-specific header of a model frame producing `model` (what the coordinator signs)."""
    return {
        "task": task,
        "round": round_no,
        "model_version": model.version(),
        "spec": model.spec.to_dict(),
        "encoding": encoding,
        **fields,
    }
