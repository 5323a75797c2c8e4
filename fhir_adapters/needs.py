"""What a feature spec needs from a FHIR server: per resource type, the search that selects it.

`needs_for(spec)` is the one place that says which resources a spec reads. Everything that pulls data is
derived from its answer: REST search parameters (chunked to keep URLs short), Bulk `_typeFilter`s, the edge
mirror's searches, and the local check of a resource that came without a server-side filter. A new kind of
feature (Encounters for follow-up, medications...) only adds its type and codes here.

Token values follow FHIR search syntax: `system|code` (exact), `system|` (every code of the system: how
ICD-10 label codes, which match by prefix, are asked for, since token search has no prefix), `code` (any
system).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    from .featurespec import FeatureSpec

Token = tuple[str | None, str | None]  # (system, code); None system: any system; None code: any code
MAX_PARAM_CHARS = 1500  # characters of token values per search (URLs stay well under common 8 KB limits)


def _escape(value: str) -> str:
    """Escape FHIR search's special characters in a token part."""
    for ch in ("\\", ",", "|", "$"):
        value = value.replace(ch, "\\" + ch)
    return value


def token_text(tok: Token) -> str:
    system, code = tok
    if system is None:
        return _escape(code or "")
    return f"{_escape(system)}|{_escape(code) if code is not None else ''}"


@dataclass(frozen=True)
class TypeNeed:
    """The resources of one type a spec reads: all of them (param None), or those whose `element`
    (a CodeableConcept, or a list of them) has a coding matching one of `tokens`, searched by `param`."""

    resource_type: str
    param: str | None = None
    tokens: frozenset[Token] = frozenset()
    element: str = "code"

    @property
    def everything(self) -> bool:
        return self.param is None

    def token_texts(self) -> list[str]:
        return sorted(token_text(t) for t in self.tokens)

    def search_params(self, max_chars: int = MAX_PARAM_CHARS) -> list[list[tuple[str, str]]]:
        """One parameter list per search: the tokens OR'ed with commas, split so no value passes max_chars."""
        if self.param is None:
            return [[]]
        chunks: list[list[str]] = [[]]
        size = 0
        for text in self.token_texts():
            if chunks[-1] and size + len(text) + 1 > max_chars:
                chunks.append([])
                size = 0
            chunks[-1].append(text)
            size += len(text) + 1
        return [[(self.param, ",".join(c))] for c in chunks]

    def type_filter(self) -> str | None:
        """The Bulk `_typeFilter` value: a URL-encoded query, since _typeFilter is itself a comma-separated
        list (the commas between tokens travel as %2C). One per type: the Bulk spec ORs several filters of a
        type, but servers differ, so all tokens go in one."""
        if self.param is None:
            return None
        return f"{self.resource_type}?{urlencode({self.param: ','.join(self.token_texts())})}"

    def matches(self, res: Mapping[str, Any]) -> bool:
        """Whether the search would select `res` (for resources pulled without a server-side filter)."""
        if res.get("resourceType") != self.resource_type:
            return False
        if self.param is None:
            return True
        value = res.get(self.element)
        concepts = value if isinstance(value, list) else [value]
        for cc in concepts:
            for c in (cc.get("coding") or ()) if isinstance(cc, dict) else ():
                if isinstance(c, dict) and self._token_matches(c.get("system"), c.get("code")):
                    return True
        return False

    def _token_matches(self, system: object, code: object) -> bool:
        return (system, code) in self.tokens or (system, None) in self.tokens or (None, code) in self.tokens

    def signature(self) -> str:
        """A short stable hash of the search, stored with the mirror to notice that the spec asks for more."""
        text = f"{self.resource_type}?{self.param}:{self.element}={','.join(self.token_texts())}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def union(self, other: TypeNeed) -> TypeNeed:
        """Both needs in one search (everything wins; different parameters cannot be OR'ed: everything)."""
        if other.resource_type != self.resource_type:
            raise ValueError(f"cannot merge needs of {self.resource_type} and {other.resource_type}")
        if self.everything or other.everything or (self.param, self.element) != (other.param, other.element):
            return TypeNeed(self.resource_type)
        return TypeNeed(self.resource_type, self.param, self.tokens | other.tokens, self.element)


def merge_needs(*groups: Iterable[TypeNeed]) -> dict[str, TypeNeed]:
    """Needs by resource type, the needs of one type merged into one search."""
    out: dict[str, TypeNeed] = {}
    for group in groups:
        for need in group:
            prev = out.get(need.resource_type)
            out[need.resource_type] = need if prev is None else prev.union(need)
    return out


def needs_for(spec: FeatureSpec) -> dict[str, TypeNeed]:
    """What `spec` reads: every Patient (each is a row), the Observations with a feature code, and the
    Conditions with a label code (ICD-10 label codes match by prefix, so their whole system is asked for)."""
    obs: set[Token] = {(c.system, c.code) for f in spec.features for c in f.codes}
    label = spec.label
    cond: set[Token] = {(c.system, None if c.system in label.prefix_systems else c.code) for c in label.codes}
    return merge_needs(
        [
            TypeNeed("Patient"),
            TypeNeed("Observation", "code", frozenset(obs)),
            TypeNeed("Condition", "code", frozenset(cond)),
        ]
    )
