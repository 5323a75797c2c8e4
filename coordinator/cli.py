"""`fhai-coordinator`: run a federated task, watch it, manage devices, and the demo."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
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
    task_file: Annotated[
        str, typer.Argument(help="Task YAML file, or a task name from the config folders or the package")
    ],
    store: Store = DEFAULT_STORE,
    work_dir: WorkDir = Path("state/coordinator"),
    broker: Annotated[
        str | None, typer.Option(help="MQTT broker HOST:PORT (default: the --broker-dir's, else 127.0.0.1:1883)")
    ] = None,
    broker_dir: Annotated[
        Path | None,
        typer.Option(help="Broker folder from `fhai-coordinator init`: connect with its coordinator account"),
    ] = None,
    plain: Annotated[bool, typer.Option(help="With --broker-dir: use its loopback plain listener")] = False,
    enroll: Annotated[
        bool, typer.Option(help="Also answer enrollment requests (needs --broker-dir), as `enroll-service` does")
    ] = False,
    username: Annotated[str | None, typer.Option(help="MQTT username")] = None,
    password_file: Annotated[Path | None, typer.Option(help="File with the MQTT password")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate: connect with TLS")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (0: any free port)")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics endpoint binds to")] = "127.0.0.1",
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the metrics per round here")] = None,
    store_retry_s: Annotated[
        float, typer.Option(min=0, help="How long to wait out a store outage (PostgreSQL down) before stopping")
    ] = 300.0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run (or resume) TASK until its last round is committed.

    On a terminal a status line shows the round, who has answered, who is missing and the time left;
    otherwise (a service, a pipe) the same goes out as plain log lines as it happens.
    """
    from coordinator.progress import ProgressReporter
    from coordinator.report import metric_rows, plot_rounds, rounds_table
    from coordinator.service import CoordinatorService
    from coordinator.task import load_task
    from edge_runtime.keys import load_or_create_signing_key

    setup_logging(work_dir / "coordinator.log", verbose, progress=("fhai.coordinator", "fhai.enrollment"))
    task = load_task(task_file)
    if enroll and broker_dir is None:
        raise typer.BadParameter("--enroll needs --broker-dir (the enrollment service manages broker accounts)")
    if broker_dir is not None:
        from coordinator.security import BrokerDir

        settings = BrokerDir.load(broker_dir).settings("coordinator", plain=plain)
        if broker is not None:
            host, port = parse_broker(broker)
            settings = replace(settings, host=host, port=port)
    else:
        settings = broker_settings(broker or "127.0.0.1:1883", username, password_file, tls_ca)
    db = _open_store(store, store_retry_s)
    key = load_or_create_signing_key(work_dir / "coordinator.key")
    service = CoordinatorService(db, task, key, settings, work_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # systemd's stop: finish the tick, close cleanly
    with contextlib.ExitStack() as running:
        if metrics_port is not None:
            from coordinator.metrics import CoordinatorMetrics

            service.metrics = CoordinatorMetrics(service.manager)
            running.callback(service.metrics.close)
            service.metrics.serve(metrics_port, metrics_host)
        if enroll:
            from coordinator.security_cli import enrollment_in_background

            assert broker_dir is not None
            running.enter_context(enrollment_in_background(broker_dir, db, key, plain))
        with ProgressReporter(console) as progress:
            status = service.run(stop, on_tick=progress)
    rows = metric_rows(db.evaluations(task.task))
    console.print(rounds_table(rows))
    if plot is not None:
        console.print(f"plot: {plot_rounds(rows, plot, task.task)}")
    if stop.is_set() and status not in ("done", "failed"):
        console.print(f"task {task.task} stopped in state {status}; run the same command to resume")
        return
    if status != "done":
        console.print(f"[bold red]task {task.task} ended as {status}[/]: see {work_dir / 'coordinator.log'}")
        raise typer.Exit(1)


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
    out: Annotated[Path, typer.Option(help="Working folder (wiped first); the figures and plot end up here")] = Path(
        "runs/demo"
    ),
    write_docs: Annotated[
        bool, typer.Option(help="Also write the figures to docs/benchmarks/ (tracked files: for a release)")
    ] = False,
) -> None:
    """Five synthetic non-IID hospitals, five edge processes, one coordinator, a real Mosquitto."""
    from coordinator.demo import run_demo

    if bits not in (4, 8, 32):
        raise typer.BadParameter("--bits must be 4, 8 or 32")
    # On a terminal the progress bar says it all; elsewhere the coordinator's steps are plain log lines.
    setup_logging(out.parent / f"{out.name}.log", progress=() if console.is_terminal else ("fhai.coordinator",))
    run_demo(
        out,
        rounds=rounds,
        bits=bits,
        seed=seed,
        broker=parse_broker(broker) if broker else None,
        docs=Path("docs/benchmarks") if write_docs else None,
        exports=exports,
    )


@app.command()
@friendly_errors
def units(
    out: Annotated[
        Path | None, typer.Option(help="Write the units here (e.g. /etc/systemd/system), else print")
    ] = None,
) -> None:
    """The systemd units of the broker and the coordinator (fhai-broker, fhai-coordinator@TASK), with this
    install's paths filled in; the coordinator unit runs the enrollment service too (--enroll)."""
    from edge_runtime.configs import render_unit, write_units

    names = ["fhai-broker", "fhai-coordinator@"]
    if out is None:
        for name in names:
            print(f"# --- {name}.service ---\n{render_unit(name)}", end="")
        return
    for path in write_units(names, out):
        console.print(f"wrote {path}")
    console.print("then: systemctl daemon-reload && systemctl enable --now fhai-broker fhai-coordinator@TASK")


register_security_commands(app, DEFAULT_STORE, _open_store, Path("state/coordinator"))

if __name__ == "__main__":
    app()
