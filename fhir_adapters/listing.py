"""Listing what changed on a FHIR server, page by page: a keyset search by _lastUpdated, and type-level
_history for deletions. The decisions are pure (sync.py); this is the I/O around them."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from .client import FhirClient, next_link
from .errors import FhirHttpError
from .sync import HistoryEvent, history_event, instant_us, server_time

log = logging.getLogger("fhir_adapters.listing")


def _matches(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    out = []
    for entry in bundle.get("entry") or ():
        res = entry.get("resource") if isinstance(entry, dict) else None
        mode = ((entry.get("search") or {}) if isinstance(entry, dict) else {}).get("mode", "match")
        if mode == "match" and isinstance(res, dict) and res.get("resourceType") == resource_type:
            out.append(res)
    return out


class ChangeListing:
    """Resources of one type matching `params` with meta.lastUpdated >= `since`, oldest first, in pages.

    Each page is a new search from the last instant seen (keyset paging) rather than the server's next link:
    next links page by offset, so a record updated or deleted while we page leaves its place, every later
    record moves up by one, and the one at the page boundary is never seen (and, being older than the
    cursor, not seen by the next pass either). Next links are followed only through a run of records that
    share one instant and do not fit in a page, and for a server that does not sort by _lastUpdated
    (`ordered` turns False; the mirror's count check then finds what paging may have missed).

    `elements="id,meta"` asks for ids and versions only (`_elements`); a server that ignores it sends
    whole resources, which the caller can tell by sync.is_subsetted. After the first page, `server_time`
    is the server's clock when it answered and `total` the number of matches it reported (or None).
    """

    def __init__(
        self,
        client: FhirClient,
        resource_type: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        since: str | None = None,
        count: int = 500,
        elements: str | None = None,
    ) -> None:
        self.client = client
        self.resource_type = resource_type
        self.params = list(params)
        self.since = since
        self.count = count
        self.elements = elements
        self.server_time: datetime | None = None
        self.total: int | None = None
        self.ordered = True
        self.requests = 0

    def _query(self, since: str | None) -> tuple[dict[str, Any], Any]:
        p = [*self.params, ("_sort", "_lastUpdated"), ("_count", str(self.count))]
        if since is not None:
            p.append(("_lastUpdated", f"ge{since}"))
        if self.elements:
            p.append(("_elements", self.elements))
        self.requests += 1
        return self.client.get_response_json(self.resource_type, p)

    def pages(self) -> Iterator[list[dict[str, Any]]]:
        cur_text, cur_us = self.since, instant_us(self.since)
        seen_at_cur: set[object] = set()  # ids already given at instant cur (the next query lists them again)
        bundle, headers = self._query(cur_text)
        self.server_time = server_time(bundle, headers)
        total = bundle.get("total")
        self.total = total if isinstance(total, int) else None
        followed: set[str] = set()
        while True:
            page: list[dict[str, Any]] = []
            advanced = False
            for res in _matches(bundle, self.resource_type):
                lu_text = (res.get("meta") or {}).get("lastUpdated")
                lu = instant_us(lu_text)
                if lu is None or (cur_us is not None and lu < cur_us):
                    if self.ordered:
                        log.warning(
                            "%s search is not ordered by _lastUpdated: following next links", self.resource_type
                        )
                    self.ordered = False
                elif lu == cur_us:
                    if res.get("id") in seen_at_cur:
                        continue
                    seen_at_cur.add(res.get("id"))
                else:
                    cur_text, cur_us, seen_at_cur, advanced = lu_text, lu, {res.get("id")}, True
                page.append(res)
            if page:
                yield page
            nxt = next_link(bundle)
            if nxt is None:
                return
            if self.ordered and advanced:
                bundle, _ = self._query(cur_text)
                continue
            if nxt in followed:
                raise FhirHttpError(
                    f"server returned the same next link twice ({nxt})", status=200, hint="report a server bug"
                )
            followed.add(nxt)
            self.requests += 1
            bundle = self.client.get_json(nxt)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for page in self.pages():
            yield from page


def history_pages(
    client: FhirClient, resource_type: str, since: str | None, count: int = 500
) -> Iterator[list[HistoryEvent]]:
    """Events of `[type]/_history?_since=since`, newest first, page by page. Reading stops at the first event
    older than `since`: a server whose next links drop _since (SEKMET 0.1's do) would otherwise page through
    its whole history."""
    params = [("_count", str(count))] + ([("_since", since)] if since else [])
    since_us = instant_us(since)
    bundle = client.get_json(f"{resource_type}/_history", params)
    followed: set[str] = set()
    while True:
        events: list[HistoryEvent] = []
        older = False
        for entry in bundle.get("entry") or ():
            ev = history_event(entry) if isinstance(entry, dict) else None
            if ev is None or ev.resource_type != resource_type:
                continue
            if since_us is not None and ev.when_us is not None and ev.when_us < since_us:
                older = True
                break
            events.append(ev)
        if events:
            yield events
        nxt = next_link(bundle)
        if older or nxt is None or nxt in followed:
            return
        followed.add(nxt)
        bundle = client.get_json(nxt)
