"""The pure parts of a mirror sync (no I/O): instants, the per-type sync state, history events.

A pass lists what changed with `_lastUpdated=ge<since>`, oldest first, and the next pass starts from
`since = T0 - overlap`, where T0 is the server's own clock at the start of the pass (Bundle.meta.lastUpdated
of its first answer, else the Date header). Anything written after T0 has a later stamp and is listed next
time, wherever it was when the pass paged past it; the overlap covers servers that stamp a record some time
before they commit it. What is listed twice is recognised by id + version (meta.versionId) and not fetched
again. Deletions are read from `_history?_since=T0` of the previous pass: history entries carry bodies, so
they get no overlap; a deletion committed late is found by the mirror's count check instead.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .timeutil import parse_instant

SUBSETTED = "SUBSETTED"  # the tag a server puts on a resource it returned in part (_elements, _summary)


def format_instant(when: datetime) -> str:
    """An instant as FHIR servers write meta.lastUpdated: UTC, milliseconds, `Z` (rounded down, so a
    `ge` search from it never misses the instant itself)."""
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def instant_us(text: object) -> int | None:
    """Microseconds since 1970 of an instant string; None when absent or not an instant."""
    if not isinstance(text, str):
        return None
    try:
        when = parse_instant(text)
    except ValueError:
        return None
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def server_time(bundle: Mapping[str, Any], headers: Mapping[str, str]) -> datetime | None:
    """The server's clock when it answered: Bundle.meta.lastUpdated, else the HTTP Date header less one
    second (it has whole seconds, and some servers refresh it only once a second)."""
    text = (bundle.get("meta") or {}).get("lastUpdated")
    if isinstance(text, str):
        try:
            return parse_instant(text)
        except ValueError:
            pass
    date = headers.get("date")
    if date:
        try:
            return email.utils.parsedate_to_datetime(date).astimezone(UTC) - timedelta(seconds=1)
        except (TypeError, ValueError):
            return None
    return None


def is_subsetted(res: Mapping[str, Any]) -> bool:
    """Whether a search returned only part of `res` (asked with _elements): tagged SUBSETTED, or holding
    nothing but its type, id and meta."""
    for tag in (res.get("meta") or {}).get("tag") or ():
        if isinstance(tag, dict) and tag.get("code") == SUBSETTED:
            return True
    return set(res) <= {"resourceType", "id", "meta"}


def version_key(res: Mapping[str, Any]) -> str:
    """What tells two versions of a resource apart: meta.versionId, else meta.lastUpdated ('' if neither,
    which never equals a stored version, so the resource is taken)."""
    meta = res.get("meta") or {}
    return str(meta.get("versionId") or meta.get("lastUpdated") or "")


@dataclass(frozen=True)
class TypeState:
    """Where the mirror of one resource type stands. `signature` is the search the mirror holds the answer
    of (see needs.TypeNeed.signature): when the spec asks for something else, the type is pulled again."""

    signature: str
    since: str | None = None  # next pass lists _lastUpdated >= since
    history_since: str | None = None  # next pass reads _history?_since= this
    passes: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TypeState:
        d = json.loads(text)
        return cls(d["signature"], d.get("since"), d.get("history_since"), int(d.get("passes", 0)))

    def after_pass(self, t0: datetime | None, overlap: timedelta) -> TypeState:
        """The state once a pass that started at server time t0 has run to the end."""
        if t0 is None:  # a server that says nothing about its clock: read the same window again next time
            return TypeState(self.signature, self.since, self.history_since, self.passes + 1)
        return TypeState(self.signature, format_instant(t0 - overlap), format_instant(t0), self.passes + 1)


@dataclass(frozen=True)
class HistoryEvent:
    """One entry of a _history Bundle: the version it made, and whether it deleted the resource."""

    resource_type: str
    id: str
    version: str
    when_us: int | None
    deleted: bool
    resource: dict[str, Any] | None


def history_event(entry: Mapping[str, Any]) -> HistoryEvent | None:
    """Read a history entry (None when it names no resource). A deletion has request.method DELETE (or a
    response status 204/410 and no resource)."""
    request = entry.get("request") or {}
    response = entry.get("response") or {}
    res = entry.get("resource")
    res = res if isinstance(res, dict) else None
    status = str(response.get("status") or "")
    deleted = request.get("method") == "DELETE" or (res is None and status[:3] in ("204", "410"))
    rtype, rid = _type_and_id(res, str(request.get("url") or ""), str(entry.get("fullUrl") or ""))
    if not rtype or not rid:
        return None
    etag = str(response.get("etag") or "")
    version = etag.removeprefix("W/").strip('"') or (version_key(res) if res else "")
    when = response.get("lastModified") or ((res or {}).get("meta") or {}).get("lastUpdated")
    return HistoryEvent(rtype, rid, version, instant_us(when), deleted, None if deleted else res)


def _type_and_id(res: Mapping[str, Any] | None, url: str, full_url: str) -> tuple[str, str]:
    if res is not None and isinstance(res.get("id"), str):
        return str(res.get("resourceType") or ""), res["id"]
    for text in (url, full_url):
        parts = text.split("?")[0].rstrip("/").split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) >= 2 and parts[-2][:1].isupper():
            return parts[-2], parts[-1]
    return "", ""


def newest_events(events: Iterable[HistoryEvent]) -> dict[str, HistoryEvent]:
    """The latest event per id (history lists newest first, but the time decides, not the order)."""
    out: dict[str, HistoryEvent] = {}
    for ev in events:
        prev = out.get(ev.id)
        if prev is None or (ev.when_us or 0) > (prev.when_us or 0):
            out[ev.id] = ev
    return out
