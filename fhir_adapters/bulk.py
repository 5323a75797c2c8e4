"""FHIR Bulk Data ($export) client: kick-off, polling with Retry-After and X-Progress, streamed ndjson.

    bulk = BulkExportClient(client)
    manifest = bulk.export(level="patient", types=["Patient", "Observation", "Condition"])
    for resource in bulk.iter_resources(manifest, report): ...

`BulkExportSource` wraps this as a ResourceSource (one export per iter_resources call).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .client import FhirClient, retry_after_seconds
from .errors import BulkExportError, FhirHttpError
from .sources import iter_ndjson
from .validation import IngestReport

log = logging.getLogger("fhir_adapters.bulk")

Level = Literal["system", "patient", "group"]


@dataclass(frozen=True)
class BulkFile:
    type: str
    url: str
    count: int | None = None


@dataclass(frozen=True)
class BulkManifest:
    transaction_time: str
    request: str
    requires_access_token: bool
    output: list[BulkFile] = field(default_factory=list)
    error: list[BulkFile] = field(default_factory=list)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> BulkManifest:
        def files(key: str) -> list[BulkFile]:
            return [BulkFile(str(f["type"]), str(f["url"]), f.get("count")) for f in body.get(key) or ()]

        return cls(
            transaction_time=str(body.get("transactionTime", "")),
            request=str(body.get("request", "")),
            requires_access_token=bool(body.get("requiresAccessToken", False)),
            output=files("output"),
            error=files("error"),
        )


def kickoff_path(level: Level, group_id: str | None = None) -> str:
    if level == "system":
        return "$export"
    if level == "patient":
        return "Patient/$export"
    if level == "group":
        if not group_id:
            raise BulkExportError("a Group export needs a group id", hint="pass group_id")
        return f"Group/{group_id}/$export"
    raise BulkExportError(f"unknown export level {level!r}", hint="use system, patient or group")


class BulkExportClient:
    def __init__(
        self,
        client: FhirClient,
        *,
        poll_interval: float = 1.0,  # when the server gives no Retry-After
        max_poll_interval: float = 60.0,
        timeout: float = 3600.0,
        on_progress: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.timeout = timeout
        self.on_progress = on_progress
        self._sleep = sleep
        self.progress_seen: list[str] = []

    def kickoff(
        self,
        level: Level = "system",
        *,
        group_id: str | None = None,
        types: Collection[str] | None = None,
        since: str | None = None,
        type_filters: Collection[str] | None = None,
    ) -> str:
        """Start an export; returns the status URL (Content-Location)."""
        params: list[tuple[str, str]] = [("_outputFormat", "application/fhir+ndjson")]
        if types:
            params.append(("_type", ",".join(types)))
        if since:
            params.append(("_since", since))
        for tf in type_filters or ():
            params.append(("_typeFilter", tf))
        r = self.client.send(
            "GET",
            kickoff_path(level, group_id),
            params=params,
            headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
            ok=(202,),
        )
        status_url = r.headers.get("Content-Location")
        if not status_url:
            raise BulkExportError("the $export kick-off answered 202 without Content-Location", hint="server bug")
        log.info("bulk export started: %s", status_url)
        return status_url

    def wait(self, status_url: str) -> BulkManifest:
        """Poll the status URL until the manifest is ready, honouring Retry-After and reporting X-Progress."""
        deadline = time.monotonic() + self.timeout
        delay = self.poll_interval
        while True:
            try:
                r = self.client.send("GET", status_url, ok=(200, 202), headers={"Accept": "application/json"})
            except FhirHttpError as e:
                raise BulkExportError(
                    f"bulk export failed: {e.message}", hint="see the server's log; start a new export", detail=e.detail
                ) from e
            if r.status_code == 200:
                return BulkManifest.from_json(orjson.loads(r.content))
            progress = r.headers.get("X-Progress")
            if progress:
                self.progress_seen.append(progress)
                if self.on_progress:
                    self.on_progress(progress)
                log.info("bulk export in progress: %s", progress)
            wait = retry_after_seconds(r.headers.get("Retry-After"))
            if wait is None:
                wait = delay
                delay = min(self.max_poll_interval, delay * 1.5)
            if time.monotonic() + wait > deadline:
                raise BulkExportError(
                    f"bulk export not done after {self.timeout:.0f}s", hint="raise the timeout or export fewer types"
                )
            self._sleep(wait)

    def cancel(self, status_url: str) -> None:
        self.client.send("DELETE", status_url, ok=(200, 202, 204, 404))

    def export(
        self,
        level: Level = "system",
        *,
        group_id: str | None = None,
        types: Collection[str] | None = None,
        since: str | None = None,
        type_filters: Collection[str] | None = None,
    ) -> BulkManifest:
        return self.wait(self.kickoff(level, group_id=group_id, types=types, since=since, type_filters=type_filters))

    def iter_file_lines(self, manifest: BulkManifest, f: BulkFile) -> Iterator[bytes]:
        """Stream one output file line by line; sends the access token only when the manifest requires it."""
        with self.client.stream(f.url, authenticate=manifest.requires_access_token) as r:
            yield from _byte_lines(r.iter_bytes())

    def iter_resources(
        self, manifest: BulkManifest, report: IngestReport, types: Collection[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        for f in manifest.output:
            if types is not None and f.type not in types:
                continue
            yield from iter_ndjson(self.iter_file_lines(manifest, f), report, types)


def _byte_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines without decoding (orjson takes bytes)."""
    rest = b""
    for chunk in chunks:
        if b"\n" not in chunk:
            rest += chunk
            continue
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


class BulkExportSource:
    """A ResourceSource that runs one Bulk $export per iter_resources call (types become _type)."""

    def __init__(
        self, client: FhirClient, level: Level = "patient", group_id: str | None = None, since: str | None = None
    ) -> None:
        self.bulk = BulkExportClient(client)
        self.level: Level = level
        self.group_id = group_id
        self.since = since
        self.manifest: BulkManifest | None = None

    def iter_resources(
        self, types: Collection[str] | None = None, report: IngestReport | None = None
    ) -> Iterator[dict[str, Any]]:
        rep = report if report is not None else IngestReport()
        self.manifest = self.bulk.export(self.level, group_id=self.group_id, types=types, since=self.since)
        yield from self.bulk.iter_resources(self.manifest, rep, types)
