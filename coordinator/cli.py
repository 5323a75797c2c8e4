"""`fhai-coordinator`: run a federated task, watch it, manage devices, and the demo."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from coordinator.errors import CoordinatorError
from coordinator.security_cli import DEFAULT_BROKER_DIR, register_security_commands, revoke_broker_account
from coordinator.store import Store as StoreClass
from edge_runtime.console import broker_settings, console, friendly_errors, parse_broker, setup_logging
from edge_runtime.errors import EdgeError

app = typer.Typer(help="FH-AI coordinator: rounds, aggregation, model export.")
devices_app = typer.Typer(help="Enrolled devices")
app.add_typer(devices_app, name="devices")

Store = Annotated[str, typer.Option("--store", help="SQLAlchemy URL of the coordinator store")]
WorkDir = Annotated[Path, typer.Option("--work-dir", help="Coordinator key, spill files and logs")]
DEFAULT_STORE = "sqlite:///state/coordinator/fhai.db"
CLI_STORE_RETRY_S = 5.0  # a one-off command waits out a short store outage, `run` (--store-retry-s) longer


def _open_store(url: str, retry_s: float = CLI_STORE_RETRY_S) -> StoreClass:
    return StoreClass(url, retry_s=retry_s)


@app.command()
@friendly_errors
def key(work_dir: WorkDir = Path("state/coordinator")) -> None:
    """Print the coordinator's public key (devices need it to trust announcements); creates it if missing."""
    from edge_runtime.keys import load_or_create_signing_key, public_hex

    print(public_hex(load_or_create_signing_key(work_dir / "coordinator.key")))


@app.command()
@friendly_errors
def run(
    task_file: Annotated[Path, typer.Argument(help="Task YAML (see firmware_configs/tasks/)")],
    store: Store = DEFAULT_STORE,
    work_dir: WorkDir = Path("state/coordinator"),
    broker: Annotated[str, typer.Option(help="MQTT broker HOST:PORT")] = "127.0.0.1:1883",
    username: Annotated[str | None, typer.Option(help="MQTT username")] = None,
    password_file: Annotated[Path | None, typer.Option(help="File with the MQTT password")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate: connect with TLS")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the metrics per round here")] = None,
    store_retry_s: Annotated[
        float, typer.Option(min=0, help="How long to wait out a store outage (PostgreSQL down) before stopping")
    ] = 300.0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run (or resume) the task in TASK_FILE until its last round is committed."""
    from coordinator.report import metric_rows, plot_rounds, rounds_table
    from coordinator.service import CoordinatorService
    from coordinator.task import load_task
    from edge_runtime.keys import load_or_create_signing_key

    setup_logging(work_dir / "coordinator.log", verbose)
    task = load_task(task_file)
    db = _open_store(store, store_retry_s)
    settings = broker_settings(broker, username, password_file, tls_ca)
    service = CoordinatorService(db, task, load_or_create_signing_key(work_dir / "coordinator.key"), settings, work_dir)
    with Live(console=console, refresh_per_second=4) as live:
        status = service.run(on_tick=lambda m: live.update(status_line(m.status(), task.rounds)))
    rows = metric_rows(db.evaluations(task.task))
    console.print(rounds_table(rows))
    if plot is not None:
        console.print(f"plot: {plot_rounds(rows, plot, task.task)}")
    if status != "done":
        console.print(f"[bold red]task {task.task} ended as {status}[/]: see {work_dir / 'coordinator.log'}")
        raise typer.Exit(1)


def status_line(s: dict[str, object], rounds: int) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_row(
        f"[bold]{s['task']}[/]",
        f"round {s['round']}/{rounds} ({s['phase']}, {s['status']})",
        f"updates {s['accepted']}/{s['cohort']}",
        f"online {s['online']}",
        f"model {s['model_version']}",
    )
    return grid


@app.command()
@friendly_errors
def status(
    task: Annotated[str, typer.Argument(help="Task id")],
    store: Store = DEFAULT_STORE,
    work_dir: WorkDir = Path("state/coordinator"),
) -> None:
    """Rounds, metrics and rejected updates of a task (read from the store; safe while it runs)."""
    from coordinator.report import metric_rows, rounds_table
    from coordinator.store_faults import where

    setup_logging(work_dir / "coordinator.log")
    db = _open_store(store)
    if db.get_task(task) is None:
        raise typer.BadParameter(f"no task {task!r} in {store}")
    table = Table(title=f"Rounds of {task}")
    for col in ("round", "phase", "status", "cohort", "accepted", "extensions"):
        table.add_column(col)
    for r in db.rounds(task):
        table.add_row(
            str(r.round),
            r.phase,
            r.status,
            str(len(json.loads(r.cohort))),
            str(len(db.accepted_devices(task, r.round))),
            str(r.extensions),
        )
    console.print(table)
    console.print(f"store: {db.size_bytes() / 2**20:.1f} MB on disk ({where(db.engine.url)})")
    console.print(rounds_table(metric_rows(db.evaluations(task))))
    rejected = db.rejections(task)
    if rejected:
        rej = Table(title="Rejected updates")
        for col in ("round", "device", "code", "reason"):
            rej.add_column(col)
        for x in rejected[-20:]:
            rej.add_row(str(x.round), x.device_id, x.code, x.reason)
        console.print(rej)


@app.command()
@friendly_errors
def recover(
    task: Annotated[str, typer.Argument(help="Task id")],
    store: Store = DEFAULT_STORE,
    work_dir: WorkDir = Path("state/coordinator"),
) -> None:
    """Reopen a failed (or stuck) task from its last committed round; then `run` it again with the same YAML."""
    from coordinator.lease import claim_task
    from coordinator.task import parse_task
    from edge_runtime.keys import load_signing_key

    setup_logging(work_dir / "coordinator.log")
    db = _open_store(store)
    row = db.get_task(task)
    if row is None:
        raise typer.BadParameter(f"no task {task!r} in {store}")
    deadline_s = parse_task(json.loads(row.definition)).round_deadline_s
    with claim_task(db, task, load_signing_key(work_dir / "coordinator.key"), work_dir):
        reopened = db.reopen_task(task, time.time() + deadline_s)
    cp = db.latest_checkpoint(task)
    last = f"round {cp.round}" if cp is not None else "no round yet"
    console.print(
        f"task {task} is running again from its last committed round ({last}); reopened rounds: "
        f"{reopened or 'none'}. Start it with `fhai-coordinator run` and the task's YAML"
    )


@app.command()
@friendly_errors
def export(
    task: Annotated[str, typer.Argument(help="Task id")],
    out: Annotated[Path, typer.Option(help="Folder for the model files and cards")],
    round_no: Annotated[int | None, typer.Option("--round", help="Committed round (default: the latest)")] = None,
    formats: Annotated[list[str] | None, typer.Option("--format", help="onnx, tflite, tflite_int8 (repeat)")] = None,
    store: Store = DEFAULT_STORE,
) -> None:
    """Export a committed global model for on-device inference (e.g. to retry a failed export)."""
    from coordinator.distribution import EXPORTERS, build_artifacts
    from coordinator.task import parse_task
    from edge_runtime.inference import save_model_files
    from edge_runtime.messages import model_from_body

    db = _open_store(store)
    row = db.get_task(task)
    if row is None:
        raise typer.BadParameter(f"no task {task!r} in {store}")
    chosen = formats or ["onnx", "tflite", "tflite_int8"]
    unknown = sorted(set(chosen) - set(EXPORTERS))
    if unknown:
        raise typer.BadParameter(f"unknown formats {unknown}; choose from {sorted(EXPORTERS)}")
    cp = db.latest_checkpoint(task) if round_no is None else db.checkpoint(task, round_no)
    if cp is None:
        raise typer.BadParameter(f"task {task!r} has no committed round {round_no if round_no is not None else ''}")
    meta = json.loads(cp.meta)
    definition = parse_task(json.loads(row.definition))
    artifacts = build_artifacts(
        model_from_body(json.loads(cp.spec), cp.model),
        chosen,  # type: ignore[arg-type]
        name=task,
        feature_spec_hash=definition.spec().spec_hash(),
        columns=meta.get("columns", []),
        units=meta.get("units", []),
        rounds=cp.round,
    )
    for fmt, artifact in artifacts.items():
        files = save_model_files(artifact.data, artifact.card, artifact.suffix, out / task)
        console.print(f"{fmt}: {', '.join(str(p) for p in files.values())}")


@devices_app.command("add")
@friendly_errors
def devices_add(
    device_id: Annotated[str, typer.Argument()],
    public_key: Annotated[str, typer.Option(help="The device's Ed25519 public key (hex), from `fhai-edge init`")],
    site: Annotated[str, typer.Option(help="Hospital / site name")] = "",
    store: Store = DEFAULT_STORE,
) -> None:
    """Register a device's signing key (enrollment without the MQTT token flow)."""
    from edge_runtime.keys import public_from_hex
    from edge_runtime.wire import check_device_id

    check_device_id(device_id)
    public_from_hex(public_key)
    _open_store(store).add_device(device_id, public_key, site)
    console.print(f"device {device_id} added")


@devices_app.command("import")
@friendly_errors
def devices_import(
    keys_file: Annotated[
        Path, typer.Argument(help="CSV of device_id,public_key lines (e.g. `fhai-edge simulate --keys-out`)")
    ],
    site: Annotated[str, typer.Option(help="Hospital / site name for all of them")] = "",
    store: Store = DEFAULT_STORE,
) -> None:
    """Register many devices' signing keys at once."""
    from edge_runtime.keys import public_from_hex
    from edge_runtime.wire import check_device_id

    rows = []
    for number, line in enumerate(keys_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        device_id, _, key = line.strip().partition(",")
        try:
            check_device_id(device_id)
            public_from_hex(key)
        except EdgeError as exc:
            raise CoordinatorError("FHAI-S706", f"{keys_file}:{number}: {exc.message}") from exc
        rows.append((device_id, key))
    console.print(f"{_open_store(store).add_devices(rows, site)} devices added")


@devices_app.command("list")
@friendly_errors
def devices_list(store: Store = DEFAULT_STORE) -> None:
    table = Table(title="Devices")
    for col in ("device", "site", "public key", "state"):
        table.add_column(col)
    for d in _open_store(store).devices():
        table.add_row(d.id, d.site, d.public_key[:16] + "...", "revoked" if d.revoked_at else "enrolled")
    console.print(table)


@devices_app.command("revoke")
@friendly_errors
def devices_revoke(
    device_id: Annotated[str, typer.Argument()],
    store: Store = DEFAULT_STORE,
    broker_dir: Annotated[
        Path, typer.Option(help="Broker folder from `init`: also delete the device's broker account")
    ] = DEFAULT_BROKER_DIR,
    plain: Annotated[bool, typer.Option(help="Reach the broker through its loopback plain listener")] = False,
) -> None:
    """Stop accepting anything signed by DEVICE_ID, and delete its broker account (which ends its session)."""
    if not _open_store(store).revoke_device(device_id):
        raise typer.BadParameter(f"no device {device_id!r}")
    console.print(f"device {device_id} revoked")
    if (broker_dir / "broker.json").exists():
        revoke_broker_account(broker_dir, device_id, plain)
        console.print(f"broker account {device_id} deleted; its session was closed")
    else:
        console.print(f"[yellow]no broker folder at {broker_dir}[/]: the device's broker account, if any, remains")


@app.command()
@friendly_errors
def demo(
    rounds: Annotated[int, typer.Option(min=1, max=200, help="Training rounds")] = 10,
    bits: Annotated[int, typer.Option(help="Update quantization: 4, 8 or 32 bits")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic hospitals")] = 7,
    exports: Annotated[bool, typer.Option(help="Export and push ONNX/TFLite models after each round")] = True,
    broker: Annotated[str | None, typer.Option(help="Use this MQTT broker HOST:PORT instead of starting one")] = None,
    out: Annotated[Path, typer.Option(help="Working folder (wiped first)")] = Path("runs/demo"),
    docs: Annotated[Path, typer.Option(help="Where the figures and plots go")] = Path("docs/benchmarks"),
) -> None:
    """Five synthetic non-IID hospitals, five edge processes, one coordinator, a real Mosquitto."""
    from coordinator.demo import run_demo

    if bits not in (4, 8, 32):
        raise typer.BadParameter("--bits must be 4, 8 or 32")
    setup_logging(out.parent / f"{out.name}.log")
    run_demo(
        out,
        rounds=rounds,
        bits=bits,
        seed=seed,
        broker=parse_broker(broker) if broker else None,
        docs=docs,
        exports=exports,
    )


register_security_commands(app, DEFAULT_STORE, _open_store, Path("state/coordinator"))

if __name__ == "__main__":
    app()
