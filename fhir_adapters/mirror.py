"""The edge's local copy of what a spec needs from its FHIR server: one SQLite file.

One row per resource, keyed by (type, id), with its version (meta.versionId), meta.lastUpdated and the raw
JSON bytes as the server sent them (never re-serialised). A sync writes only the rows whose version changed
and deletes what the server deleted; the feature builder reads the bodies straight from the rows
(`MirrorSource`). The sync state of each type (TypeState) is stored in the same file, so it moves in the same
transaction as the rows it covers. See docs/decisions/0009-fhir-mirror.md.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import MirrorError
from .sources import iter_ndjson
from .sync import TypeState
from .validation import IngestReport

log = logging.getLogger("fhir_adapters.mirror")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version TEXT NOT NULL,
    last_updated_us INTEGER,
    body BLOB NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE TABLE IF NOT EXISTS sync_state (type TEXT PRIMARY KEY, state TEXT NOT NULL);
"""
Row = tuple[str, str, int | None, bytes]  # id, version, lastUpdated (µs since 1970), body
_IN_CHUNK = 500  # ids per `IN (...)` (SQLite allows 32766 variables; smaller keeps statements cheap)


class MirrorStore:
    """The mirror file. Use as a context manager (or call close()); one thread at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.conn = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions (see write())
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses at most the last commit
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                self.conn.close()
                raise MirrorError(
                    f"{self.path} was written by another version of FH-AI (schema {version})",
                    hint="delete the file: the next sync pulls the data again",
                )
            self.conn.executescript(_SCHEMA)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.path.chmod(0o600)
        except sqlite3.DatabaseError as e:
            if hasattr(self, "conn"):
                self.conn.close()
            raise MirrorError(
                f"cannot open the FHIR mirror {self.path}: {e}",
                hint="check the disk and permissions; if the file is damaged, delete the file: the next sync "
                "pulls the data again",
            ) from e

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> MirrorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def write(self) -> Iterator[None]:
        """One transaction: everything inside lands together or not at all."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---------------- rows ----------------

    def versions(self, rtype: str, ids: Iterable[str]) -> dict[str, str]:
        """The stored version of each of `ids` that the mirror holds."""
        out: dict[str, str] = {}
        id_list = list(ids)
        for i in range(0, len(id_list), _IN_CHUNK):
            chunk = id_list[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT id, version FROM resources WHERE type=? AND id IN ({marks})"
            out.update(self.conn.execute(q, (rtype, *chunk)).fetchall())
        return out

    def upsert(self, rtype: str, rows: Sequence[Row]) -> None:
        self.conn.executemany(
            "INSERT INTO resources (type, id, version, last_updated_us, body) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (type, id) DO UPDATE SET version=excluded.version, "
            "last_updated_us=excluded.last_updated_us, body=excluded.body",
            [(rtype, *row) for row in rows],
        )

    def delete(self, rtype: str, ids: Iterable[str]) -> int:
        before = self.conn.total_changes
        self.conn.executemany("DELETE FROM resources WHERE type=? AND id=?", [(rtype, i) for i in ids])
        return self.conn.total_changes - before

    def clear(self, rtype: str) -> None:
        self.conn.execute("DELETE FROM resources WHERE type=?", (rtype,))
        self.conn.execute("DELETE FROM sync_state WHERE type=?", (rtype,))

    def count(self, rtype: str, before_us: int | None = None) -> int:
        """Rows of a type (only those last updated before `before_us`, when given)."""
        if before_us is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM resources WHERE type=?", (rtype,)).fetchone()[0])
        q = "SELECT COUNT(*) FROM resources WHERE type=? AND last_updated_us < ?"
        return int(self.conn.execute(q, (rtype, before_us)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT type, COUNT(*) FROM resources GROUP BY type").fetchall())

    def bodies(self, rtype: str) -> Iterator[bytes]:
        """The raw JSON of every resource of a type (rows as bytes: no tuple per row)."""
        cur = self.conn.cursor()
        cur.row_factory = lambda _c, row: row[0]
        return iter(cur.execute("SELECT body FROM resources WHERE type=?", (rtype,)))

    def keys(self, rtype: str) -> dict[str, str]:
        """id -> version of every row of a type (the reconciliation sweep compares these with the server)."""
        return dict(self.conn.execute("SELECT id, version FROM resources WHERE type=?", (rtype,)).fetchall())

    # ---------------- sync state ----------------

    def state(self, rtype: str) -> TypeState | None:
        row = self.conn.execute("SELECT state FROM sync_state WHERE type=?", (rtype,)).fetchone()
        return TypeState.from_json(row[0]) if row else None

    def set_state(self, rtype: str, state: TypeState) -> None:
        self.conn.execute(
            "INSERT INTO sync_state (type, state) VALUES (?, ?) ON CONFLICT (type) DO UPDATE SET state=excluded.state",
            (rtype, state.to_json()),
        )


class MirrorSource:
    """A ResourceSource over a mirror file. `iter_files` hands the builder each type's bodies as lines of
    raw JSON (FeatureBuilder.add_ndjson parses them in its own loop), as NdjsonDirSource does with files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def iter_files(self, types: Collection[str] | None = None) -> Iterator[Iterator[bytes]]:
        with MirrorStore(self.path) as store:
            for rtype in sorted(types if types is not None else store.counts()):
                yield store.bodies(rtype)

    def iter_resources(
        self, types: Collection[str] | None = None, report: IngestReport | None = None
    ) -> Iterator[dict[str, Any]]:
        rep = report if report is not None else IngestReport()
        for lines in self.iter_files(types):
            yield from iter_ndjson(lines, rep, types)
