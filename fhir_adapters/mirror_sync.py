"""Keeping a mirror (mirror.MirrorStore) equal to what a spec needs from a FHIR server.

    with FhirClient(url, auth=...) as client, MirrorStore(path) as store:
        report = MirrorSync(client, store, needs_for(spec)).run()

One run, for each resource type the spec needs (needs.TypeNeed):

1. **First sync by Bulk $export** when the mirror is empty, the CapabilityStatement offers $export and the
   first sync is large (SyncOptions.bulk): `_type` = the needed types, `_typeFilter` = their searches; each
   line is checked locally as well (a server may ignore _typeFilter) and stored as sent. The state starts
   at the export's transactionTime.
2. **What changed**: a keyset search by _lastUpdated from the type's cursor (listing.ChangeListing: no
   record updated mid-pass can be skipped). A type's first pass lists whole resources; later passes list
   ids and versions only (`_elements=id,meta`) and fetch (`_id=...`) just the versions the mirror lacks, so
   an unchanged resync reads no bodies.
3. **Deletions** from `[type]/_history?_since=` where the CapabilityStatement offers history-type: deleted
   ids are removed, and a mirrored record whose newest version no longer matches the search is dropped.
4. **Count check**: the server's count of matches last updated before the pass started, against the
   mirror's. A difference (a server without history, a deletion history does not show, an expunge) starts a
   sweep: every id and version is listed, what the server lacks is removed, what differs fetched. A server
   that reports no totals is swept every pass.
5. The type's state moves to T0 - overlap (sync.TypeState.after_pass), T0 being the server's clock at the
   start of the pass: what is written after T0 is listed next time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson

from .bulk import BulkExportClient, BulkManifest
from .capabilities import export_level, supports_type_history
from .client import FhirClient
from .errors import BulkExportError, FhirHttpError
from .listing import ChangeListing, history_pages
from .mirror import MirrorStore, Row
from .needs import TypeNeed
from .sync import HistoryEvent, TypeState, format_instant, instant_us, is_subsetted, newest_events, version_key
from .timeutil import parse_instant

log = logging.getLogger("fhir_adapters.mirror_sync")

Progress = Callable[[str, str, int, int | None], None]  # (resource type, phase, done, total or None)
_BULK_BATCH = 2000  # lines per executemany while storing an export


@dataclass(frozen=True)
class SyncOptions:
    page_size: int = 500  # _count of listings and history pages
    fetch_chunk: int = 100  # ids per `_id=` search (about 4 KB of URL with 36-character ids)
    overlap: timedelta = timedelta(seconds=10)  # how long a server may take to commit a stamped record
    # First sync by Bulk $export: "always" when the server offers it; "auto" when it offers it and the
    # first sync is large (bulk_min_resources matches, counted with _summary=count): an export costs a
    # kick-off and polling, and servers may evaluate _typeFilter slowly (SEKMET: about 60x a search, see
    # docs/fhir.md), so a small first sync is quicker by search; "never".
    bulk: Literal["auto", "always", "never"] = "auto"
    bulk_min_resources: int = 100_000


@dataclass
class TypeReport:
    """What one run did to one resource type."""

    resource_type: str
    via: str = "search"  # "bulk" when the type was first pulled by $export in this run
    listed: int = 0  # entries listed (ids, or whole resources on a first pass)
    bodies: int = 0  # resource bodies received (listing, fetch, history, export)
    written: int = 0  # rows inserted or replaced
    deleted: int = 0  # rows removed (deleted on the server, or no longer matching the search)
    swept: bool = False  # the count check disagreed, or the server gives no totals: every id was listed
    rows: int = 0  # rows of the type in the mirror after the run


@dataclass
class SyncReport:
    types: dict[str, TypeReport] = field(default_factory=dict)
    bulk: bool = False
    seconds: float = 0.0
    requests: int = 0

    def changed(self) -> dict[str, int]:
        """Rows written or removed, by type."""
        return {t: r.written + r.deleted for t, r in self.types.items()}


class MirrorSync:
    def __init__(
        self,
        client: FhirClient,
        store: MirrorStore,
        needs: Mapping[str, TypeNeed],
        options: SyncOptions | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.needs = dict(needs)
        self.opt = options or SyncOptions()
        self.on_progress = on_progress

    def _progress(self, rtype: str, phase: str, done: int, total: int | None) -> None:
        if self.on_progress is not None:
            self.on_progress(rtype, phase, done, total)

    def run(self) -> SyncReport:
        """One sync of every needed type; raises the client's errors (nothing is half-applied: rows land
        page by page with their versions, the cursor only after the whole type)."""
        t_start, req_start = time.perf_counter(), self.client.requests_sent
        cs = self.client.capabilities()  # refuses a non-R4 server before anything else
        report = SyncReport(types={t: TypeReport(t) for t in self.needs})
        states: dict[str, TypeState | None] = {}
        for rtype, need in self.needs.items():
            state = self.store.state(rtype)
            if state is not None and state.signature != need.signature():
                log.info("%s: the spec needs another search than the mirror holds: pulling the type again", rtype)
                with self.store.write():
                    self.store.clear(rtype)
                state = None
            states[rtype] = state
        level = export_level(cs)
        if level is not None and all(s is None for s in states.values()) and self._bulk_pays():
            try:
                states.update(self._bulk(level, report))
                report.bulk = True
            except (BulkExportError, FhirHttpError) as e:
                log.warning("Bulk $export failed (%s): first sync by search instead", e.one_line())
        for rtype, need in self.needs.items():
            self._sync_type(need, states[rtype], supports_type_history(cs, rtype), report.types[rtype])
        for rtype, rep in report.types.items():
            rep.rows = self.store.count(rtype)
        report.seconds = time.perf_counter() - t_start
        report.requests = self.client.requests_sent - req_start
        log.info(
            "mirror sync in %.2fs, %d requests%s: %s",
            report.seconds,
            report.requests,
            " (first by Bulk $export)" if report.bulk else "",
            {t: (r.written, r.deleted, r.bodies) for t, r in report.types.items()},
        )
        return report

    # ---------------- first sync by Bulk $export ----------------

    def _bulk_pays(self) -> bool:
        if self.opt.bulk != "auto":
            return self.opt.bulk == "always"
        size = 0
        for need in self.needs.values():
            for params in need.search_params():
                total = self.client.get_json(need.resource_type, [*params, ("_summary", "count")]).get("total")
                if not isinstance(total, int):
                    return True  # no count: assume it is large
                size += total
        log.info("first sync: %d resources match the spec's searches (Bulk from %d)", size, self.opt.bulk_min_resources)
        return size >= self.opt.bulk_min_resources

    def _bulk(self, level: Literal["system", "patient"], report: SyncReport) -> dict[str, TypeState]:
        bulk = BulkExportClient(self.client, on_progress=lambda p: self._progress("*", f"export {p}", 0, None))
        filters = [tf for need in self.needs.values() if (tf := need.type_filter()) is not None]
        manifest = bulk.export(level, types=sorted(self.needs), type_filters=filters)
        if manifest.error:
            log.warning("Bulk $export reported %d error file(s): %s", len(manifest.error), manifest.error)
        since = self._transaction_time(manifest)
        with self.store.write():  # all of the export or nothing: an interrupted first sync starts again
            for f in manifest.output:
                need = self.needs.get(f.type)
                if need is None:
                    continue
                rep = report.types[f.type]
                rep.via = "bulk"
                self._store_lines(need, bulk.iter_file_lines(manifest, f), rep, f.count)
            states = {t: TypeState(n.signature(), since, manifest.transaction_time) for t, n in self.needs.items()}
            for rtype, state in states.items():
                self.store.set_state(rtype, state)
        return states

    def _transaction_time(self, manifest: BulkManifest) -> str:
        try:
            return format_instant(parse_instant(manifest.transaction_time) - self.opt.overlap)
        except ValueError as e:
            raise BulkExportError(
                f"the export manifest has no usable transactionTime ({manifest.transaction_time!r})",
                hint="server bug: the mirror falls back to search",
            ) from e

    def _store_lines(self, need: TypeNeed, lines: Iterable[bytes], rep: TypeReport, total: int | None) -> None:
        rows: list[Row] = []
        for line in lines:
            if not line.strip():
                continue
            rep.listed += 1
            rep.bodies += 1
            try:
                res = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("%s export: a line that is not JSON was left out", need.resource_type)
                continue
            if isinstance(res, dict) and isinstance(res.get("id"), str) and need.matches(res):
                meta = res.get("meta") or {}
                rows.append((res["id"], version_key(res), instant_us(meta.get("lastUpdated")), bytes(line)))
            if len(rows) >= _BULK_BATCH:
                self.store.upsert(need.resource_type, rows)
                rep.written += len(rows)
                rows = []
                self._progress(need.resource_type, "export", rep.listed, total)
        self.store.upsert(need.resource_type, rows)
        rep.written += len(rows)
        self._progress(need.resource_type, "export", rep.listed, total)

    # ---------------- one type ----------------

    def _sync_type(self, need: TypeNeed, state: TypeState | None, history: bool, rep: TypeReport) -> None:
        rtype = need.resource_type
        ids_only = state is not None  # the mirror holds this type: list versions, fetch only what changed
        starts: list[datetime | None] = []
        for params in need.search_params():
            listing = ChangeListing(
                self.client,
                rtype,
                params,
                since=state.since if state else None,
                count=self.opt.page_size,
                elements="id,meta" if ids_only else None,
            )
            for page in listing.pages():
                rep.listed += len(page)
                self._take(rtype, page, rep)
                self._progress(rtype, "list", rep.listed, listing.total)
            starts.append(listing.server_time)
        t0 = None if None in starts else min(t for t in starts if t is not None)
        if history and state is not None and state.history_since is not None:
            self._deletions_from_history(need, state.history_since, rep)
        if not self._counts_agree(need, t0):
            self._sweep(need, rep)
        with self.store.write():
            self.store.set_state(rtype, (state or TypeState(need.signature())).after_pass(t0, self.opt.overlap))

    def _take(self, rtype: str, page: list[dict[str, Any]], rep: TypeReport) -> list[str]:
        """Store the page's new versions: bodies as listed, or fetched by id when only versions were
        listed. Returns the page's ids."""
        ids = [r["id"] for r in page if isinstance(r.get("id"), str)]
        have = self.store.versions(rtype, ids)
        bodies: list[dict[str, Any]] = []
        stubs: list[str] = []
        for r in page:
            rid = r.get("id")
            if not isinstance(rid, str):
                continue
            if is_subsetted(r):
                if have.get(rid) != version_key(r) or not version_key(r):
                    stubs.append(rid)
            else:
                rep.bodies += 1
                if have.get(rid) != version_key(r) or not version_key(r):
                    bodies.append(r)
        for i in range(0, len(stubs), self.opt.fetch_chunk):
            chunk = stubs[i : i + self.opt.fetch_chunk]
            fetched = list(self.client.search(rtype, [("_id", ",".join(chunk))], count=len(chunk)))
            rep.bodies += len(fetched)
            bodies += [r for r in fetched if r.get("id") in chunk]  # one gone since it was listed: history says
        rows = [_row(r) for r in bodies]
        with self.store.write():
            self.store.upsert(rtype, rows)
        rep.written += len(rows)
        return ids

    # ---------------- deletions ----------------

    def _deletions_from_history(self, need: TypeNeed, since: str, rep: TypeReport) -> None:
        rtype = need.resource_type
        mirrored: dict[str, str] = {}
        events: list[HistoryEvent] = []
        seen = 0
        for page in history_pages(self.client, rtype, since, self.opt.page_size):
            seen += len(page)
            rep.bodies += sum(1 for ev in page if ev.resource is not None)
            have = self.store.versions(rtype, {ev.id for ev in page})
            mirrored.update(have)
            events += [ev for ev in page if ev.id in have]  # what is not mirrored the listing handles
            self._progress(rtype, "history", seen, None)
        gone: list[str] = []
        rows: list[Row] = []
        for rid, ev in newest_events(events).items():
            if ev.deleted:
                gone.append(rid)
            elif ev.version != mirrored[rid]:
                if ev.resource is not None and need.matches(ev.resource):
                    rows.append(_row(ev.resource))
                else:
                    gone.append(rid)  # changed so that the search no longer selects it
        with self.store.write():
            rep.deleted += self.store.delete(rtype, gone)
            self.store.upsert(rtype, rows)
        rep.written += len(rows)

    def _counts_agree(self, need: TypeNeed, t0: datetime | None) -> bool:
        """Whether the server and the mirror hold as many matches last updated before t0 (False when the
        server gives no total: the caller sweeps)."""
        if t0 is None:
            return False
        before = format_instant(t0)
        server = 0
        for params in need.search_params():
            bundle = self.client.get_json(
                need.resource_type, [*params, ("_lastUpdated", f"lt{before}"), ("_summary", "count")]
            )
            total = bundle.get("total")
            if not isinstance(total, int):
                return False
            server += total
        mirror = self.store.count(need.resource_type, before_us=instant_us(before))
        if server != mirror:
            log.info(
                "%s: the server has %d matches before %s, the mirror %d: sweeping",
                need.resource_type,
                server,
                before,
                mirror,
            )
        return server == mirror

    def _sweep(self, need: TypeNeed, rep: TypeReport) -> None:
        """List every id and version; remove what the server no longer has, fetch what differs."""
        rtype = need.resource_type
        rep.swept = True
        listed: set[str] = set()
        for params in need.search_params():
            listing = ChangeListing(self.client, rtype, params, count=self.opt.page_size, elements="id,meta")
            for page in listing.pages():
                listed.update(self._take(rtype, page, rep))
                self._progress(rtype, "sweep", len(listed), listing.total)
        gone = [rid for rid in self.store.keys(rtype) if rid not in listed]
        with self.store.write():
            rep.deleted += self.store.delete(rtype, gone)


def _row(res: dict[str, Any]) -> Row:
    meta = res.get("meta") or {}
    return res["id"], version_key(res), instant_us(meta.get("lastUpdated")), orjson.dumps(res)
