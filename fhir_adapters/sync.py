"""Incremental sync cursor for `_lastUpdated` (pure: no I/O).

The cursor holds the highest meta.lastUpdated seen (`since`, as the server wrote it) and the ids seen at
exactly that instant. The next pass asks for `_lastUpdated=ge<since>` sorted by _lastUpdated: `ge`, not `gt`,
so a record written later in the same clock tick is not lost; and the ids at the boundary are skipped, so
nothing is yielded twice. Records older than `since` that a server still returns (rounding) are skipped.
The resources' own meta.lastUpdated is used rather than Bundle.meta.lastUpdated: the bundle's time is when
the search ran, and a record committed during the pass with an earlier stamp would fall behind it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .timeutil import parse_instant


@dataclass(frozen=True)
class SyncCursor:
    """Where the last incremental pass stopped. Persist it with to_json() and restore with from_json()."""

    resource_type: str
    since: str | None = None
    seen_at_since: tuple[str, ...] = field(default_factory=tuple)

    def query_params(self) -> list[tuple[str, str]]:
        p = [("_sort", "_lastUpdated")]
        if self.since is not None:
            p.append(("_lastUpdated", f"ge{self.since}"))
        return p

    def to_json(self) -> str:
        return json.dumps(
            {"resource_type": self.resource_type, "since": self.since, "seen_at_since": list(self.seen_at_since)}
        )

    @classmethod
    def from_json(cls, text: str) -> SyncCursor:
        d = json.loads(text)
        return cls(d["resource_type"], d.get("since"), tuple(d.get("seen_at_since") or ()))


class CursorTracker:
    """Decides which resources of a pass are new and computes the next cursor."""

    def __init__(self, cursor: SyncCursor) -> None:
        self.cursor = cursor
        self._since = parse_instant(cursor.since) if cursor.since else None
        self._boundary = set(cursor.seen_at_since)
        self._max: datetime | None = None
        self._max_text: str | None = None
        self._max_ids: set[str] = set()
        self.skipped = 0

    def accept(self, res: dict[str, Any]) -> bool:
        text = (res.get("meta") or {}).get("lastUpdated")
        rid = str(res.get("id"))
        if not isinstance(text, str):
            return True  # cannot place it in time: yield it, it does not move the cursor
        try:
            lu = parse_instant(text)
        except ValueError:
            return True
        if self._since is not None and (lu < self._since or (lu == self._since and rid in self._boundary)):
            self.skipped += 1
            return False
        if self._max is None or lu > self._max:
            self._max, self._max_text, self._max_ids = lu, text, {rid}
        elif lu == self._max:
            self._max_ids.add(rid)
        return True

    def next_cursor(self) -> SyncCursor:
        if self._max is None or self._max_text is None:
            return self.cursor
        ids = self._max_ids
        if self._since is not None and self._max == self._since:
            ids = ids | self._boundary
        return SyncCursor(self.cursor.resource_type, self._max_text, tuple(sorted(ids)))
