"""Where a device's records come from: a FHIR R4 server (mirrored locally, synced incrementally by
_lastUpdated), or a folder of Bulk ndjson files or Bundles. Records never leave the device."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from edge_runtime.errors import ConfigError
from fhir_adapters.auth import BearerAuth
from fhir_adapters.client import FhirClient
from fhir_adapters.features import USED_TYPES, FeatureTable, build_feature_table
from fhir_adapters.featurespec import FeatureSpec
from fhir_adapters.sources import BundleDirSource, NdjsonDirSource, ResourceSource
from fhir_adapters.sync import SyncCursor

log = logging.getLogger("fhai.edge.data")


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fhir", "ndjson", "bundles"]
    location: str  # base URL or folder
    token_file: str | None = None  # bearer token for the FHIR server, read from a file (mode 0600)
    ca_bundle: str | None = None
    page_size: int = 500

    @classmethod
    def parse(cls, text: str, token_file: str | None = None, ca_bundle: str | None = None) -> SourceConfig:
        """`http(s)://...` is a FHIR server; a folder with .ndjson files is Bulk output; else Bundles."""
        if text.startswith(("http://", "https://")):
            return cls(kind="fhir", location=text, token_file=token_file, ca_bundle=ca_bundle)
        folder = Path(text)
        if not folder.is_dir():
            raise ConfigError("FHAI-D001", f"data source {text!r} is neither an http(s) FHIR base URL nor a folder")
        has_ndjson = any(folder.glob("*.ndjson")) or any(folder.glob("*.ndjson.gz"))
        return cls(kind="ndjson" if has_ndjson else "bundles", location=text)


class FhirMirror:
    """A local copy of the server's Patient/Observation/Condition resources, refreshed incrementally.

    Each pass asks only for what changed since the persisted cursor, so round after round the server
    sees small queries; the mirror keeps the latest version of each resource by id.
    """

    def __init__(self, cfg: SourceConfig, folder: Path) -> None:
        self.cfg = cfg
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cursor_file = folder / "cursors.json"

    def _client(self) -> FhirClient:
        auth = None
        if self.cfg.token_file:
            auth = BearerAuth(Path(self.cfg.token_file).read_text().strip())
        return FhirClient(self.cfg.location, auth=auth, verify=self.cfg.ca_bundle or True)

    def _load(self, rtype: str) -> dict[str, bytes]:
        path = self.folder / f"{rtype}.ndjson"
        if not path.exists():
            return {}
        out: dict[str, bytes] = {}
        for line in path.read_bytes().splitlines():
            if line.strip():
                out[str(orjson.loads(line)["id"])] = line
        return out

    def refresh(self) -> dict[str, int]:
        """Pull what changed since the last pass; returns the count of new or changed resources by type."""
        cursors: dict[str, Any] = json.loads(self.cursor_file.read_text()) if self.cursor_file.exists() else {}
        changed: dict[str, int] = {}
        with self._client() as client:
            client.capabilities()  # refuses a non-R4 server before anything else
            for rtype in USED_TYPES:
                cursor = SyncCursor.from_json(cursors[rtype]) if rtype in cursors else SyncCursor(rtype)
                current = self._load(rtype)
                sync = client.sync(cursor, count=self.cfg.page_size)
                n = 0
                for res in sync:
                    current[str(res["id"])] = orjson.dumps(res)
                    n += 1
                tmp = self.folder / f"{rtype}.ndjson.tmp"
                tmp.write_bytes(b"\n".join(current.values()) + (b"\n" if current else b""))
                tmp.replace(self.folder / f"{rtype}.ndjson")
                cursors[rtype] = sync.cursor.to_json()
                changed[rtype] = n
        tmp = self.cursor_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cursors))
        tmp.replace(self.cursor_file)  # the cursor moves only after the data it covers is on disk
        log.info("FHIR sync from %s: %s", self.cfg.location, changed)
        return changed

    def source(self) -> ResourceSource:
        return NdjsonDirSource(self.folder)


class SiteData:
    """The device's view of its hospital's records, turned into feature tables on demand."""

    def __init__(self, cfg: SourceConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.mirror = FhirMirror(cfg, state_dir / "fhir-mirror") if cfg.kind == "fhir" else None

    def table(self, spec: FeatureSpec) -> FeatureTable:
        source: ResourceSource
        if self.mirror is not None:
            self.mirror.refresh()
            source = self.mirror.source()
        elif self.cfg.kind == "ndjson":
            source = NdjsonDirSource(self.cfg.location)
        else:
            source = BundleDirSource(self.cfg.location)
        table = build_feature_table(source, spec)
        log.info("feature table: %d rows x %d columns from %s", table.n_rows, table.X.shape[1], self.cfg.location)
        return table
