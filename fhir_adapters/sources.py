"""Where resources come from. Every source yields resources (dicts) through one interface, so the feature
builder does not care whether they came from REST search, Bulk $export or files on disk."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson

from . import validation as v
from .errors import SourceError
from .validation import IngestReport

if TYPE_CHECKING:
    from .client import FhirClient
    from .needs import TypeNeed

log = logging.getLogger("fhir_adapters.sources")


@runtime_checkable
class ResourceSource(Protocol):
    """Yields FHIR resources as dicts. `types` narrows to those resourceTypes (None: all); malformed input
    is counted in `report` (when given) and skipped, never raised."""

    def iter_resources(
        self, types: Collection[str] | None = None, report: IngestReport | None = None
    ) -> Iterator[dict[str, Any]]: ...


def iter_ndjson(
    lines: Iterable[bytes], report: IngestReport, types: Collection[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Resources of an ndjson stream (one JSON object a line, blank lines skipped)."""
    loads = orjson.loads
    for line in lines:
        if len(line) < 3 and not line.strip():  # blank line (strip() would copy every line)
            continue
        try:
            obj = loads(line)
        except orjson.JSONDecodeError:
            report.reject(v.MALFORMED_JSON, line[:120].decode("utf-8", "replace"))
            continue
        if obj.__class__ is not dict:
            report.reject(v.NOT_AN_OBJECT, str(obj)[:120])
            continue
        if types is not None and obj.get("resourceType") not in types:
            if "resourceType" not in obj:
                report.reject(v.MISSING_RESOURCE_TYPE, line[:120].decode("utf-8", "replace"))
            continue
        yield obj


def _open(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _ndjson_type(path: Path) -> str | None:
    """Bulk file names start with the resource type (Observation.ndjson, Observation-2.ndjson.gz...)."""
    stem = path.name.split(".")[0].split("-")[0].split("_")[0]
    return stem if stem[:1].isupper() else None


class NdjsonDirSource:
    """A directory of Bulk Data ndjson files (.ndjson, .ndjson.gz). Files named after a type that is not
    wanted are skipped without being read."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SourceError(f"{self.directory} is not a directory", hint="point to the ndjson export folder")

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")) and p.is_file())

    def iter_resources(
        self, types: Collection[str] | None = None, report: IngestReport | None = None
    ) -> Iterator[dict[str, Any]]:
        rep = report if report is not None else IngestReport()
        for f in self.iter_files(types):
            yield from iter_ndjson(f, rep, types)

    def iter_files(self, types: Collection[str] | None = None) -> Iterator[IO[bytes]]:
        """The files that may hold `types`, open for reading as ndjson text (lines of bytes), one at a time:
        for consumers that parse each line in their own loop (FeatureBuilder.add_ndjson)."""
        for path in self.files():
            ftype = _ndjson_type(path)
            if types is not None and ftype is not None and ftype not in types:
                continue
            with _open(path) as f:
                yield f


class BundleDirSource:
    """A directory of FHIR Bundles (transaction, collection, searchset...) or single resources, as .json
    or .json.gz files; a file that cannot be parsed is counted and skipped."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SourceError(f"{self.directory} is not a directory", hint="point to the bundle folder")

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.name.endswith((".json", ".json.gz")))

    def iter_resources(
        self, types: Collection[str] | None = None, report: IngestReport | None = None
    ) -> Iterator[dict[str, Any]]:
        rep = report if report is not None else IngestReport()
        for path in self.files():
            try:
                with _open(path) as f:
                    raw = f.read()
            except (OSError, EOFError) as e:
                rep.reject(v.MALFORMED_JSON, f"{path.name}: {e}")
                continue
            doc = v.parse_json(raw, rep)
            if doc is None:
                continue
            yield from iter_bundle_resources(doc, rep, types)


def iter_bundle_resources(
    doc: dict[str, Any], report: IngestReport, types: Collection[str] | None = None
) -> Iterator[dict[str, Any]]:
    """The resources inside a Bundle (nested Bundles are not opened), or the document itself."""
    if doc.get("resourceType") != "Bundle":
        if "resourceType" not in doc:
            report.reject(v.MISSING_RESOURCE_TYPE, str(doc.get("id")))
        elif types is None or doc["resourceType"] in types:
            yield doc
        return
    for entry in doc.get("entry") or ():
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict):
            report.reject(v.NOT_AN_OBJECT, f"Bundle/{doc.get('id')} entry without resource")
            continue
        if "resourceType" not in res:
            report.reject(v.MISSING_RESOURCE_TYPE, str(res.get("id")))
            continue
        if types is None or res["resourceType"] in types:
            yield res


class ListSource:
    """Resources already in memory (tests, the synthetic generator)."""

    def __init__(self, resources: Iterable[dict[str, Any]]) -> None:
        self.resources = list(resources)

    def iter_resources(
        self, types: Collection[str] | None = None, report: IngestReport | None = None
    ) -> Iterator[dict[str, Any]]:
        for r in self.resources:
            if types is None or r.get("resourceType") in types:
                yield r


class FhirSearchSource:
    """Resources from a FHIR server's REST search, page by page (following the server's next links).

    `needs` narrows each type's search, e.g. `needs_for(spec)` so only the spec's Observation codes are
    fetched; a type whose search is split in several (long code lists) is de-duplicated by id."""

    def __init__(self, client: FhirClient, *, needs: Mapping[str, TypeNeed] | None = None, count: int = 500) -> None:
        self.client = client
        self.needs = dict(needs or {})
        self.count = count

    def iter_resources(
        self, types: Collection[str] | None = None, report: IngestReport | None = None
    ) -> Iterator[dict[str, Any]]:
        if types is None:
            types = list(self.needs)
        if not types:
            raise SourceError("a FHIR search source needs the resource types to fetch", hint="pass types or needs")
        for rtype in types:
            need = self.needs.get(rtype)
            chunks = need.search_params() if need is not None else [[]]
            seen: set[object] = set()
            for params in chunks:
                for res in self.client.search(rtype, params, count=self.count):
                    if len(chunks) > 1:
                        if res.get("id") in seen:
                            continue
                        seen.add(res.get("id"))
                    yield res
