"""Where a device's records come from: a FHIR R4 server (mirrored locally: what the task's spec needs,
synced incrementally, deletions included), or a folder of Bulk ndjson files or Bundles. Records never
leave the device."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.errors import ConfigError
from fhir_adapters.auth import BearerAuth
from fhir_adapters.client import FhirClient
from fhir_adapters.features import FeatureTable, build_feature_table
from fhir_adapters.featurespec import FeatureSpec
from fhir_adapters.mirror import MirrorSource, MirrorStore
from fhir_adapters.mirror_sync import MirrorSync, SyncOptions, SyncReport
from fhir_adapters.needs import needs_for
from fhir_adapters.sources import BundleDirSource, NdjsonDirSource, ResourceSource

log = logging.getLogger("fhai.edge.data")


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fhir", "ndjson", "bundles"]
    location: str  # base URL or folder
    token_file: str | None = None  # bearer token for the FHIR server, read from a file (mode 0600)
    ca_bundle: str | None = None
    page_size: int = Field(default=500, ge=1, le=1000)
    bulk: Literal["auto", "always", "never"] = "auto"  # first sync by Bulk $export (see SyncOptions.bulk)

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
    """The device's copy of what its task's spec needs from the hospital's FHIR server: one SQLite file
    (fhir_adapters.mirror) that fhir_adapters.mirror_sync keeps equal to the server, deletions included.
    Each refresh asks only for what changed since the last one."""

    def __init__(self, cfg: SourceConfig, folder: Path) -> None:
        self.cfg = cfg
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = folder / "mirror.sqlite3"
        self.last_report: SyncReport | None = None
        for old in [*folder.glob("*.ndjson"), folder / "cursors.json"]:  # the ndjson mirror of earlier versions
            old.unlink(missing_ok=True)

    def _client(self) -> FhirClient:
        auth = None
        if self.cfg.token_file:
            auth = BearerAuth(Path(self.cfg.token_file).read_text().strip())
        return FhirClient(self.cfg.location, auth=auth, verify=self.cfg.ca_bundle or True)

    def refresh(self, spec: FeatureSpec) -> dict[str, int]:
        """Pull what changed since the last pass; returns the rows written or removed, by type."""
        options = SyncOptions(page_size=self.cfg.page_size, bulk=self.cfg.bulk)
        with self._client() as client, MirrorStore(self.path) as store:
            self.last_report = MirrorSync(client, store, needs_for(spec), options).run()
        log.info("FHIR sync from %s: %s", self.cfg.location, self.last_report.changed())
        return self.last_report.changed()

    def source(self) -> ResourceSource:
        return MirrorSource(self.path)


class SiteData:
    """The device's view of its hospital's records, turned into feature tables on demand."""

    def __init__(self, cfg: SourceConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.mirror = FhirMirror(cfg, state_dir / "fhir-mirror") if cfg.kind == "fhir" else None

    def table(self, spec: FeatureSpec) -> FeatureTable:
        source: ResourceSource
        if self.mirror is not None:
            self.mirror.refresh(spec)
            source = self.mirror.source()
        elif self.cfg.kind == "ndjson":
            source = NdjsonDirSource(self.cfg.location)
        else:
            source = BundleDirSource(self.cfg.location)
        table = build_feature_table(source, spec)
        log.info("feature table: %d rows x %d columns from %s", table.n_rows, table.X.shape[1], self.cfg.location)
        return table
