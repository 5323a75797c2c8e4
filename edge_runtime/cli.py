"""`fhai-edge`: set up a device, join a federated task, show its state."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edge_runtime.console import broker_settings, console, friendly_errors, setup_logging
from edge_runtime.enroll import load_credentials
from edge_runtime.enroll_cli import register_enroll_command
from edge_runtime.errors import EdgeError
from edge_runtime.keys import load_or_create_signing_key, public_hex

# One BLAS thread on the edge (before numpy loads): batch-32 products gain nothing from more, and idle
# OpenBLAS pool threads spin on a small device's cores while the runtime starts.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
log = logging.getLogger("fhai.edge")

app = typer.Typer(help="FH-AI edge runtime: trains on this hospital's FHIR data, sends only model updates.")

StateDir = Annotated[Path, typer.Option("--state-dir", help="Folder for this device's keys, cursors and residuals")]


@app.command()
@friendly_errors
def init(state_dir: StateDir = Path("state/edge")) -> None:
    """Create this device's signing key (if missing) and print its public key for enrollment."""
    key = load_or_create_signing_key(state_dir / "device.key")
    console.print(f"device public key: [bold]{public_hex(key)}[/]")
    print(public_hex(key))


@app.command()
@friendly_errors
def run(
    task: Annotated[str, typer.Option(help="Task id to join")],
    source: Annotated[str, typer.Option(help="FHIR R4 base URL, or a folder of Bulk ndjson / Bundles")],
    device_id: Annotated[
        str | None, typer.Option(help="This device's id (default: the enrolled one, from STATE_DIR)")
    ] = None,
    coordinator_key: Annotated[
        str | None, typer.Option(help="Coordinator's public key, hex or a file (default: the enrolled one)")
    ] = None,
    state_dir: StateDir = Path("state/edge"),
    profile: Annotated[str, typer.Option(help="Device profile name or YAML path")] = "gateway",
    broker: Annotated[
        str | None, typer.Option(help="MQTT broker HOST:PORT (default: the enrolled one, else 127.0.0.1:1883)")
    ] = None,
    username: Annotated[
        str | None, typer.Option(help="MQTT username (default: STATE_DIR/credentials.json from `enroll`)")
    ] = None,
    password_file: Annotated[Path | None, typer.Option(help="File with the MQTT password")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate: connect with TLS")] = None,
    token_file: Annotated[Path | None, typer.Option(help="File with the FHIR server's bearer token")] = None,
    fhir_ca: Annotated[Path | None, typer.Option(help="CA bundle for the FHIR server")] = None,
    stay: Annotated[bool, typer.Option(help="Keep serving after the task's final round")] = False,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (0: any free port)")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics endpoint binds to")] = "127.0.0.1",
    log_file: Annotated[Path | None, typer.Option(help="Log file (default: STATE_DIR/edge.log)")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Join TASK and serve its rounds until it ends.

    After `fhai-edge enroll`, --task and --source are all it needs: the device id, the coordinator's key,
    the broker and its account come from STATE_DIR/credentials.json.
    """
    from edge_runtime.agent import AgentConfig, EdgeAgent
    from edge_runtime.profile import load_profile
    from edge_runtime.site_data import SourceConfig

    setup_logging(log_file or state_dir / "edge.log", verbose, progress=("fhai.edge",))
    enrolled = load_credentials(state_dir) if username is None else None
    settings = broker_settings(broker or "127.0.0.1:1883", username, password_file, tls_ca)
    if enrolled is not None:  # the account `fhai-edge enroll` stored
        if device_id is not None and enrolled.device_id != device_id:
            raise typer.BadParameter(f"{state_dir} is enrolled as {enrolled.device_id!r}, not {device_id!r}")
        device_id = enrolled.device_id
        settings = (
            enrolled.broker if broker is None else replace(enrolled.broker, host=settings.host, port=settings.port)
        )
        settings = settings if tls_ca is None else replace(settings, ca_file=str(tls_ca))
        coordinator_key = coordinator_key or enrolled.coordinator_key
    if device_id is None or coordinator_key is None:
        missing = " and ".join(
            f for f, v in (("--device-id", device_id), ("--coordinator-key", coordinator_key)) if v is None
        )
        raise typer.BadParameter(
            f"{state_dir} holds no enrollment: enroll the device first (`fhai-edge enroll`), or give {missing}"
        )
    key_text = Path(coordinator_key).read_text().strip() if Path(coordinator_key).is_file() else coordinator_key
    if enrolled is not None and key_text != enrolled.coordinator_key:
        log.warning("--coordinator-key differs from the key this device enrolled with; using the one given")
    cfg = AgentConfig(
        device_id=device_id,
        task=task,
        state_dir=state_dir,
        source=SourceConfig.parse(source, str(token_file) if token_file else None, str(fhir_ca) if fhir_ca else None),
        profile=load_profile(profile),
        coordinator_key=key_text,
        broker=settings,
        exit_when_done=not stay,
    )
    if metrics_port is not None:
        from edge_runtime.monitoring import EdgeMetrics

        cfg.metrics = EdgeMetrics(device_id, task)
        cfg.metrics.serve(metrics_port, metrics_host)
    console.print(
        f"[bold]{device_id}[/] joining task [bold]{task}[/] on {settings.host}:{settings.port} (data: {source})"
    )
    try:
        EdgeAgent(cfg).run()
    finally:
        if cfg.metrics is not None:
            cfg.metrics.close()
    console.print(f"[green]task {task} finished[/]")


@app.command()
@friendly_errors
def simulate(
    task: Annotated[str, typer.Option(help="Task id to join")],
    coordinator_key: Annotated[str, typer.Option(help="Coordinator's public key (hex) or a file holding it")],
    data: Annotated[str, typer.Option(help="Training data all devices share: a folder of Bulk ndjson / Bundles")],
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="How many devices")] = 100,
    broker: Annotated[str, typer.Option(help="MQTT broker HOST:PORT")] = "127.0.0.1:1883",
    prefix: Annotated[str, typer.Option(help="Device ids are PREFIX0000, PREFIX0001, ...")] = "sim-",
    seed: Annotated[int, typer.Option(help="Seeds the devices' keys and updates")] = 0,
    update: Annotated[str, typer.Option(help="noise (cheap seeded deltas) or train (the real trainer)")] = "noise",
    threads: Annotated[int, typer.Option(min=1, max=64, help="Network threads shared by all devices")] = 4,
    keys_out: Annotated[Path | None, typer.Option(help="Write device_id,public_key lines here")] = None,
    keys_only: Annotated[bool, typer.Option(help="Only write --keys-out, then exit")] = False,
    timeout_s: Annotated[float, typer.Option(help="Give up after this many seconds")] = 3600.0,
    state_dir: StateDir = Path("state/simulate"),
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run DEVICES lightweight devices in this process: real MQTT sessions, keys, codec and frames.

    Register their keys with the coordinator first: `--keys-out keys.csv --keys-only`, then
    `fhai-coordinator devices import keys.csv`. Raise `ulimit -n` above DEVICES for large fleets.
    """
    import resource

    from edge_runtime.simulate import Fleet
    from edge_runtime.site_data import SourceConfig

    if update not in ("noise", "train"):
        raise typer.BadParameter("--update must be noise or train")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not keys_only and soft < devices + 64:
        raise EdgeError(
            "FHAI-G701",
            f"{devices} devices need about {devices + 64} open files, the limit is {soft}: raise `ulimit -n`",
        )
    setup_logging(state_dir / "simulate.log", verbose)
    key_text = Path(coordinator_key).read_text().strip() if Path(coordinator_key).is_file() else coordinator_key
    fleet = Fleet(
        devices,
        task,
        broker_settings(broker),
        key_text,
        SourceConfig.parse(data),
        prefix=prefix,
        seed=seed,
        update=update,  # type: ignore[arg-type]
        threads=threads,
        state_dir=state_dir,
    )
    if keys_out is not None:
        keys_out.parent.mkdir(parents=True, exist_ok=True)
        keys_out.write_text(fleet.keys_csv())
        console.print(f"{devices} device keys written to {keys_out} (`fhai-coordinator devices import {keys_out}`)")
    if keys_only:
        return
    fleet.start()
    console.print(f"{fleet.stats.connected} of {devices} devices connected to {broker}")
    try:
        finished = fleet.wait_final(timeout_s)
    finally:
        fleet.stop()
    s = fleet.stats
    console.print(f"sent {s.sent} frames ({s.acked} acknowledged), rounds done: {dict(sorted(s.rounds_done.items()))}")
    if not finished:
        raise EdgeError("FHAI-G702", f"the task did not reach its final round within {timeout_s:.0f}s")


@app.command()
@friendly_errors
def predict(
    task: Annotated[str, typer.Option(help="Task whose deployed model scores the patients")],
    source: Annotated[str, typer.Option(help="FHIR R4 base URL, or a folder of Bulk ndjson / Bundles")],
    out: Annotated[Path, typer.Option(help="CSV of patient ids and risk scores (kept on this device)")],
    state_dir: StateDir = Path("state/edge"),
    model: Annotated[Path | None, typer.Option(help="A .tflite or .onnx file instead of the deployed model")] = None,
    token_file: Annotated[Path | None, typer.Option(help="File with the FHIR server's bearer token")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Score this hospital's patients with the task's deployed model (LiteRT or onnxruntime)."""
    import csv

    from edge_runtime.deployment import Deployment
    from edge_runtime.inference import check_compatible, load_predictor
    from edge_runtime.profile import DeviceProfile
    from edge_runtime.site_data import SiteData, SourceConfig
    from fhir_adapters.featurespec import parse_spec

    setup_logging(state_dir / "edge.log", verbose)
    deployment = Deployment(state_dir, task, DeviceProfile(profile="predict"))
    spec = parse_spec(deployment.feature_spec())
    predictor = load_predictor(model) if model else deployment.load_current()
    table = SiteData(SourceConfig.parse(source, str(token_file) if token_file else None), state_dir).table(spec)
    check_compatible(predictor.card, spec.spec_hash(), table.columns)
    proba = predictor.predict_proba(table.X)
    risk = proba[:, 1] if proba.shape[1] == 2 else proba.max(axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "index_date", "risk"])
        for pid, day, r in zip(table.patient_ids, table.index_dates(), risk, strict=True):
            writer.writerow([pid, day, f"{r:.6f}"])
    summary = Table(title=f"Scored with model {predictor.card.model_version} ({predictor.backend})")
    for col in ("patients", "mean risk", "risk >= 0.5"):
        summary.add_column(col, justify="right")
    summary.add_row(str(len(risk)), f"{risk.mean():.3f}", str(int((risk >= 0.5).sum())))
    console.print(summary)
    console.print(f"scores written to {out}")


@app.command()
@friendly_errors
def status(state_dir: StateDir = Path("state/edge")) -> None:
    """What this device has done per task: training rounds whose update reached the broker in time, and not."""
    from edge_runtime.round_log import RoundLog

    table = Table(title=f"Device state in {state_dir}")
    for col in ("task", "rounds trained", "sent late", "missed", "stats/eval rounds", "last round", "residual"):
        table.add_column(col)
    for progress in sorted(state_dir.glob("progress-*.json")):
        task = progress.stem.removeprefix("progress-")
        p = RoundLog(progress).summary()
        residual = state_dir / f"residual-{task}.npy"
        last = "-" if p.last_round is None else str(p.last_round)
        table.add_row(
            task, str(p.trained), str(p.late), str(p.missed), str(p.other), last, "yes" if residual.exists() else "no"
        )
    console.print(table)
    console.print(
        "sent late: the update reached the broker after the round's deadline (the coordinator drops it unless "
        "the round was still open); missed: the deadline passed before this device could start"
    )


@app.command()
def doctor(
    source: Annotated[
        str | None, typer.Option(help="FHIR R4 base URL (or data folder) this device reads; unchecked if omitted")
    ] = None,
    state_dir: StateDir = Path("state/edge"),
    broker: Annotated[str | None, typer.Option(help="MQTT broker HOST:PORT (default: the enrolled one)")] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA certificate of the broker (default: the enrolled one)")
    ] = None,
    token_file: Annotated[Path | None, typer.Option(help="File with the FHIR server's bearer token")] = None,
    fhir_ca: Annotated[Path | None, typer.Option(help="CA bundle for the FHIR server")] = None,
    warm: Annotated[bool, typer.Option(help="Compile the training kernels now if the cache is cold")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each server")] = 10.0,
) -> None:
    """Check this device: FHIR server and version, clock, broker and TLS, state folder, disk, Numba cache.

    One line per check; exit code 1 if any check failed (warnings do not fail)."""
    from edge_runtime.doctor import run_checks

    enrolled = load_credentials(state_dir) if state_dir.exists() else None
    settings = enrolled.broker if enrolled is not None else None
    if broker is not None:
        settings = broker_settings(
            broker, tls_ca=tls_ca or (Path(settings.ca_file) if settings and settings.ca_file else None)
        )
    elif settings is not None and tls_ca is not None:
        settings = replace(settings, ca_file=str(tls_ca))
    checks = run_checks(source, state_dir, settings, token_file, fhir_ca, warm, timeout)
    colour = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    for c in checks:
        if console.is_terminal:
            console.print(f"[{colour[c.status]}]{c.line()}[/]", soft_wrap=True, highlight=False, markup=True)
        else:
            print(c.line(), flush=True)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


@app.command()
@friendly_errors
def units(
    out: Annotated[
        Path | None, typer.Option(help="Write the unit here (e.g. /etc/systemd/system), else print it")
    ] = None,
) -> None:
    """The systemd unit of the edge runtime (fhai-edge@TASK.service), with this install's paths filled in."""
    from edge_runtime.configs import render_unit, write_units

    if out is None:
        print(render_unit("fhai-edge@"), end="")
        return
    for path in write_units(["fhai-edge@"], out):
        console.print(f"wrote {path}; then: systemctl daemon-reload && systemctl enable --now fhai-edge@TASK")


register_enroll_command(app)

if __name__ == "__main__":
    app()
