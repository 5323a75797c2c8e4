"""fhai-fhir: check a FHIR connection, keep a local mirror of what a spec needs, preview a site's feature
table (and what was rejected), export it to CSV.

Errors print one line (with the error's stable code); the detail goes to the log file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from .auth import Auth, BearerAuth, SmartBackendAuth
from .capabilities import export_level, supports_type_history
from .client import FhirClient
from .errors import FhirAdapterError, SourceError
from .features import USED_TYPES, FeatureTable, build_feature_table
from .featurespec import load_spec
from .mirror import MirrorSource, MirrorStore
from .mirror_sync import MirrorSync, SyncOptions, SyncReport
from .needs import needs_for
from .sources import BundleDirSource, FhirSearchSource, NdjsonDirSource, ResourceSource

app = typer.Typer(help="FH-AI FHIR adapters: connect to a hospital's FHIR R4 server and build feature tables.")
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("fhir_adapters.cli")

DEFAULT_LOG = Path(os.environ.get("FHAI_LOG_DIR", Path.home() / ".cache" / "fhai")) / "fhai-fhir.log"

UrlOpt = Annotated[str | None, typer.Option("--url", help="FHIR base URL, e.g. https://fhir.example/r4")]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="FHAI_FHIR_TOKEN", help="static bearer token (or FHAI_FHIR_TOKEN)")
]
ClientIdOpt = Annotated[str | None, typer.Option("--smart-client-id", help="SMART Backend Services client id")]
KeyOpt = Annotated[Path | None, typer.Option("--smart-key", help="PEM private key for the SMART client assertion")]
AlgOpt = Annotated[str, typer.Option("--smart-alg", help="RS384 or ES384")]
ScopeOpt = Annotated[str, typer.Option("--smart-scope")]
CaOpt = Annotated[Path | None, typer.Option("--ca-bundle", help="PEM CA bundle for a private CA")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="seconds per request")]
LogOpt = Annotated[Path, typer.Option("--log-file", help="where error details are written")]


def _setup_logging(path: Path) -> None:
    root = logging.getLogger("fhir_adapters")
    for h in [h for h in root.handlers if getattr(h, "_fhai_cli", False)]:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve():
            return
        root.removeHandler(h)
        h.close()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
    except OSError:
        handler = logging.NullHandler()
    handler._fhai_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


@contextmanager
def _errors(log_file: Path) -> Iterator[None]:
    _setup_logging(log_file)
    try:
        yield
    except FhirAdapterError as e:
        log.error("%s\n%s", e.one_line(), e.detail)
        err_console.print(
            f"[red]error[/red] {escape(e.one_line())} (details: {log_file})", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from e


def _auth(url: str, token: str | None, client_id: str | None, key: Path | None, alg: str, scope: str) -> Auth | None:
    if client_id:
        if key is None:
            raise SourceError("--smart-client-id needs --smart-key", hint="pass the client's PEM private key")
        return SmartBackendAuth(client_id, key, base_url=url, alg=alg, scope=scope)
    return BearerAuth(token) if token else None


def _client(
    url: str,
    token: str | None,
    client_id: str | None,
    key: Path | None,
    alg: str,
    scope: str,
    ca: Path | None,
    t: float,
) -> FhirClient:
    return FhirClient(url, auth=_auth(url, token, client_id, key, alg, scope), verify=ca if ca else True, timeout=t)


@app.command()
def check(
    url: Annotated[str, typer.Option("--url", help="FHIR base URL")],
    token: TokenOpt = None,
    smart_client_id: ClientIdOpt = None,
    smart_key: KeyOpt = None,
    smart_alg: AlgOpt = "RS384",
    smart_scope: ScopeOpt = "system/*.read",
    ca_bundle: CaOpt = None,
    timeout: TimeoutOpt = 30.0,
    log_file: LogOpt = DEFAULT_LOG,
) -> None:
    """Check a connection: FHIR version, credentials, and that Patient search answers."""
    with (
        _errors(log_file),
        _client(url, token, smart_client_id, smart_key, smart_alg, smart_scope, ca_bundle, timeout) as c,
    ):
        cs = c.capabilities()
        bundle = c.get_json("Patient", {"_count": "1", "_summary": "count"})
        sw = cs.get("software") or {}
        console.print(f"[green]ok[/green] {url}")
        console.print(f"  FHIR {cs.get('fhirVersion')}  server: {sw.get('name', '?')} {sw.get('version', '')}")
        console.print(f"  authenticated search: Patient total = {bundle.get('total', '?')}")
        history = [t for t in USED_TYPES if supports_type_history(cs, t)]
        level = export_level(cs)
        console.print(
            f"  mirror: deletions from {'_history (' + ', '.join(history) + ')' if history else 'id sweeps (no _history)'}"
            f"; first sync by {f'Bulk $export ({level} level)' if level else 'search (no $export)'}"
        )


def _source(
    url: str | None,
    ndjson: Path | None,
    bundles: Path | None,
    mirror: Path | None,
    client_args: tuple[Any, ...],
    spec: Any,
) -> tuple[ResourceSource, FhirClient | None]:
    given = [x for x in (url, ndjson, bundles, mirror) if x is not None]
    if len(given) != 1:
        raise SourceError(
            "give exactly one of --url, --ndjson, --bundles, --mirror", hint="say where the site's data is"
        )
    if ndjson is not None:
        return NdjsonDirSource(ndjson), None
    if bundles is not None:
        return BundleDirSource(bundles), None
    if mirror is not None:
        if not mirror.is_file():
            raise SourceError(f"no mirror at {mirror}", hint="run `fhai-fhir sync SPEC --url URL --mirror FILE` first")
        return MirrorSource(mirror), None
    assert url is not None
    client = _client(url, *client_args)
    client.capabilities()
    return FhirSearchSource(client, needs=needs_for(spec)), client


def _table(
    spec_path: Path,
    url: str | None,
    ndjson: Path | None,
    bundles: Path | None,
    mirror: Path | None,
    strict: bool,
    client_args: tuple[Any, ...],
) -> FeatureTable:
    spec = load_spec(spec_path)
    source, client = _source(url, ndjson, bundles, mirror, client_args, spec)
    try:
        return build_feature_table(source, spec, strict=strict)
    finally:
        if client is not None:
            client.close()


def _print_report(table: FeatureTable) -> None:
    rep = table.report
    console.print(
        f"rows {table.n_rows}  columns {len(table.columns)}  positives {int(table.y.sum())}  "
        f"spec_hash {table.spec_hash}"
    )
    console.print(f"accepted {dict(rep.accepted)}  ignored {rep.ignored}")
    if rep.rejected:
        console.print(f"[yellow]rejected {escape(str(dict(rep.rejected)))}[/yellow]")
    if rep.dropped_patients:
        console.print(f"[yellow]patients left out {dict(rep.dropped_patients)}[/yellow]")


def _print_rejections(table: FeatureTable) -> None:
    rejections = table.report.rejections()
    if not rejections:
        console.print("no resource was rejected")
        return
    t = Table(title="rejected resources (examples per reason; all of them: the debug log)")
    for col in ("reason", "count", "resource", "element", "detail"):
        t.add_column(col, overflow="fold")
    shown: set[str] = set()
    for r in rejections:
        first = r.reason not in shown
        shown.add(r.reason)
        t.add_row(
            r.reason if first else "",
            str(table.report.rejected[r.reason]) if first else "",
            escape(f"{r.resource_type}/{r.id}" if r.id else "-"),
            escape(r.element),
            escape(r.detail[:120]),
        )
    console.print(t)


SpecArg = Annotated[Path, typer.Argument(help="task or feature spec YAML")]
MirrorOpt = Annotated[Path | None, typer.Option("--mirror", help="mirror file written by `fhai-fhir sync`")]
NdjsonOpt = Annotated[Path | None, typer.Option("--ndjson", help="directory of Bulk ndjson files")]
BundlesOpt = Annotated[Path | None, typer.Option("--bundles", help="directory of Bundle .json/.json.gz files")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="validate resources with fhir.resources R4B")]


@app.command()
def preview(
    spec: SpecArg,
    url: UrlOpt = None,
    ndjson: NdjsonOpt = None,
    bundles: BundlesOpt = None,
    mirror: MirrorOpt = None,
    rows: Annotated[int, typer.Option("--rows", help="rows to show")] = 10,
    rejections: Annotated[
        bool, typer.Option("--rejections", help="list examples of rejected resources for each reason")
    ] = False,
    strict: StrictOpt = False,
    token: TokenOpt = None,
    smart_client_id: ClientIdOpt = None,
    smart_key: KeyOpt = None,
    smart_alg: AlgOpt = "RS384",
    smart_scope: ScopeOpt = "system/*.read",
    ca_bundle: CaOpt = None,
    timeout: TimeoutOpt = 30.0,
    log_file: LogOpt = DEFAULT_LOG,
) -> None:
    """Show the first rows of a site's feature table and what was rejected."""
    with _errors(log_file):
        args = (token, smart_client_id, smart_key, smart_alg, smart_scope, ca_bundle, timeout)
        table = _table(spec, url, ndjson, bundles, mirror, strict, args)
        t = Table(title=f"{table.spec_name} ({table.n_rows} rows; * = imputed)")
        t.add_column("patient", max_width=14, no_wrap=True)
        shown = [j for j, name in enumerate(table.columns) if not name.endswith("_missing")]
        flag = {
            j: table.columns.index(f"{table.columns[j]}_missing")
            for j in shown
            if f"{table.columns[j]}_missing" in table.columns
        }
        for j in shown:
            unit = table.units[j]
            t.add_column(escape(f"{table.columns[j]}\n[{unit}]") if unit else table.columns[j], justify="right")
        t.add_column(table.label_name, justify="right")
        for i in range(min(rows, table.n_rows)):
            cells = [f"{table.X[i, j]:.4g}" + ("*" if j in flag and table.X[i, flag[j]] else "") for j in shown]
            t.add_row(escape(table.patient_ids[i]), *cells, str(int(table.y[i])))
        console.print(t)
        _print_report(table)
        if rejections:
            _print_rejections(table)


@app.command("export-csv")
def export_csv(
    spec: SpecArg,
    out: Annotated[Path, typer.Argument(help="CSV file to write")],
    url: UrlOpt = None,
    ndjson: NdjsonOpt = None,
    bundles: BundlesOpt = None,
    mirror: MirrorOpt = None,
    strict: StrictOpt = False,
    no_ids: Annotated[bool, typer.Option("--no-ids", help="leave the patient ids out")] = False,
    token: TokenOpt = None,
    smart_client_id: ClientIdOpt = None,
    smart_key: KeyOpt = None,
    smart_alg: AlgOpt = "RS384",
    smart_scope: ScopeOpt = "system/*.read",
    ca_bundle: CaOpt = None,
    timeout: TimeoutOpt = 30.0,
    log_file: LogOpt = DEFAULT_LOG,
) -> None:
    """Write a site's feature table to CSV (patient ids included unless --no-ids: keep the file local)."""
    with _errors(log_file):
        args = (token, smart_client_id, smart_key, smart_alg, smart_scope, ca_bundle, timeout)
        table = _table(spec, url, ndjson, bundles, mirror, strict, args)
        table.to_csv(out, include_ids=not no_ids)
        console.print(f"wrote {out}")
        _print_report(table)


@app.command()
def sync(
    spec: SpecArg,
    url: Annotated[str, typer.Option("--url", help="FHIR base URL")],
    mirror: Annotated[Path, typer.Option("--mirror", help="the mirror file (SQLite; created on the first sync)")],
    bulk: Annotated[
        str, typer.Option("--bulk", help="first sync by Bulk $export: auto (if offered and large), always, never")
    ] = "auto",
    page_size: Annotated[int, typer.Option("--page-size", min=1, max=1000, help="_count of each page")] = 500,
    token: TokenOpt = None,
    smart_client_id: ClientIdOpt = None,
    smart_key: KeyOpt = None,
    smart_alg: AlgOpt = "RS384",
    smart_scope: ScopeOpt = "system/*.read",
    ca_bundle: CaOpt = None,
    timeout: TimeoutOpt = 30.0,
    log_file: LogOpt = DEFAULT_LOG,
) -> None:
    """Bring a local mirror of what SPEC needs up to date with the server (what changed, deletions included)."""
    with _errors(log_file):
        if bulk not in ("auto", "always", "never"):
            raise SourceError(f"unknown --bulk {bulk!r}", hint="use auto, always or never")
        needs = needs_for(load_spec(spec))
        options = SyncOptions(page_size=page_size, bulk=bulk)  # type: ignore[arg-type]
        client = _client(url, token, smart_client_id, smart_key, smart_alg, smart_scope, ca_bundle, timeout)
        with client, MirrorStore(mirror) as store, _sync_progress() as on_progress:
            report = MirrorSync(client, store, needs, options, on_progress).run()
        _print_sync(report, mirror)


@contextmanager
def _sync_progress() -> Iterator[Any]:
    """A rich progress bar per resource type, fed by MirrorSync's (type, phase, done, total) reports."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        tasks: dict[str, TaskID] = {}

        def on_progress(rtype: str, phase: str, done: int, total: int | None) -> None:
            if rtype not in tasks:
                tasks[rtype] = progress.add_task(rtype, total=None)
            progress.update(tasks[rtype], description=f"{rtype:<12} {phase}", completed=done, total=total)

        yield on_progress


def _print_sync(report: SyncReport, mirror: Path) -> None:
    t = Table(title=f"mirror {mirror}")
    for col in ("type", "via", "listed", "bodies", "written", "deleted", "swept", "rows"):
        t.add_column(col, justify="left" if col in ("type", "via") else "right")
    for r in report.types.values():
        t.add_row(
            r.resource_type,
            r.via,
            *(str(x) for x in (r.listed, r.bodies, r.written, r.deleted)),
            "yes" if r.swept else "",
            str(r.rows),
        )
    console.print(t)
    how = "first sync by Bulk $export, then search" if report.bulk else "search"
    console.print(f"synced in {report.seconds:.2f}s, {report.requests} requests ({how})")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="directory; one sub-directory per hospital")],
    hospitals: Annotated[int, typer.Option("--hospitals")] = 5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="ndjson or bundles")] = "ndjson",
    log_file: LogOpt = DEFAULT_LOG,
) -> None:
    """Write seeded synthetic hospitals (see fhir_adapters.synthetic) as Bulk ndjson or Bundles."""
    from .synthetic import generate_hospitals

    with _errors(log_file):
        if fmt not in ("ndjson", "bundles"):
            raise SourceError(f"unknown format {fmt!r}", hint="use ndjson or bundles")
        for h in generate_hospitals(hospitals, seed):
            d = out / h.site_id
            (h.write_ndjson if fmt == "ndjson" else h.write_bundles)(d)
            console.print(f"{h.site_id}: {h.n_patients} patients, {len(h.observations)} observations -> {d}")


__all__ = ["USED_TYPES", "app"]
