"""The demo: five synthetic non-IID hospitals train one model over a real Mosquitto.

Each hospital's edge runtime is its own process reading its own FHIR Bulk ndjson; the coordinator
runs here. At the end the federated model is compared, on the union of the sites' held-out
patients, with centralized training on the pooled data and with each hospital training alone,
all with the same model and the same number of local epochs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.broker import LocalBroker, free_port
from coordinator.report import MetricRow, metric_rows, plot_rounds, rounds_table, sites_table
from coordinator.rounds import RoundManager
from coordinator.service import CoordinatorService
from coordinator.store import Store
from coordinator.task import TaskDefinition, load_task
from edge_runtime.agent import LocalSplit, split_table
from edge_runtime.console import console
from edge_runtime.keys import load_or_create_signing_key, public_hex
from edge_runtime.metrics import auroc
from edge_runtime.model import Model, Standardizer
from edge_runtime.mqtt import BrokerSettings
from edge_runtime.profile import load_profile
from edge_runtime.trainer import TrainConfig, train
from fhir_adapters.features import build_feature_table
from fhir_adapters.sources import NdjsonDirSource
from fhir_adapters.synthetic import generate_hospitals

TASK_FILE = Path(__file__).resolve().parent.parent / "firmware_configs" / "tasks" / "synthetic_diabetes.yaml"
DEVICE_PROFILE = "gateway"


@dataclass
class DemoResult:
    auroc_federated: float
    auroc_centralized: float
    auroc_local: dict[str, float]
    rounds: int
    seconds: float

    @property
    def auroc_local_mean(self) -> float:
        return float(np.mean(list(self.auroc_local.values())))


def demo_task(rounds: int, bits: int, run_id: str, exports: bool = True) -> TaskDefinition:
    base = load_task(TASK_FILE)
    data = base.model_dump()
    data.update(task=f"{base.task}-{run_id}", rounds=rounds)
    data["codec"] = {**data["codec"], "bits": bits}
    if not exports:
        data["export"] = {"formats": []}
    return TaskDefinition.model_validate(data)


def baselines(task: TaskDefinition, splits: dict[str, LocalSplit], epochs: int) -> tuple[Model, dict[str, Model]]:
    """Centralized (pooled rows) and local-only models, trained with the federated run's budget."""
    profile = load_profile(DEVICE_PROFILE)
    config = TrainConfig(**{**task.train, **profile.train, "epochs": epochs})
    X = np.vstack([s.X_train for s in splits.values()])
    y = np.concatenate([s.y_train for s in splits.values()])
    spec = task.model_spec(X.shape[1])
    central = train(Model.create(spec, task.seed, Standardizer.fit(X)), X, y, config).model
    local = {
        site: train(Model.create(spec, task.seed, Standardizer.fit(s.X_train)), s.X_train, s.y_train, config).model
        for site, s in splits.items()
    }
    return central, local


def federate(
    out: Path,
    task: TaskDefinition,
    sites: list[str],
    store: Store,
    host: str,
    port: int,
    timeout_s: float,
    profile: str = DEVICE_PROFILE,
) -> CoordinatorService:
    """Enroll each site, start its edge runtime as its own process (reading out/hospitals/<site>, device
    profile `profile`: a name or a YAML path), and run the coordinator here with a progress bar until the
    task is done; the devices' state is under out/devices."""
    key = load_or_create_signing_key(out / "coordinator" / "coordinator.key")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for site in sites:
            state = out / "devices" / site
            store.add_device(site, public_hex(load_or_create_signing_key(state / "device.key")), site)
            cmd = [
                sys.executable, "-m", "edge_runtime.cli", "run",
                "--task", task.task, "--device-id", site,
                "--source", str(out / "hospitals" / site),
                "--coordinator-key", public_hex(key),
                "--state-dir", str(state), "--profile", profile,
                "--broker", f"{host}:{port}",
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(state / "stderr.log").open("wb")))
        console.print(f"started {len(procs)} edge runtimes (logs in {out / 'devices'}/*/edge.log)")

        service = CoordinatorService(store, task, key, BrokerSettings(host, port), out / "coordinator")
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("rounds", total=task.rounds + 1, detail="waiting for devices")

            def on_tick(m: RoundManager) -> None:
                s = m.status()
                progress.update(
                    bar,
                    completed=max(0, m.model_round + 1),
                    detail=f"round {s['round']} {s['phase']}: {s['accepted']}/{s['cohort']} updates, {s['online']} online",
                )

            status = service.run(on_tick=on_tick, timeout_s=timeout_s)
        if status != "done":
            raise RuntimeError(f"the federated task ended as {status}: see {out / 'coordinator' / 'coordinator.log'}")
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    return service


def run_demo(
    out: Path,
    rounds: int = 10,
    bits: int = 8,
    seed: int = 7,
    broker: tuple[str, int] | None = None,
    docs: Path = Path("docs/benchmarks"),
    timeout_s: float = 900.0,
    exports: bool = True,
) -> DemoResult:
    started = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run_id = f"s{seed}-{int(time.time())}"
    task = demo_task(rounds, bits, run_id, exports)

    console.rule("[bold]FH-AI federated demo")
    hospitals = generate_hospitals(5, seed=seed)
    for h in hospitals:
        h.write_ndjson(out / "hospitals" / h.site_id)
    sites = [h.site_id for h in hospitals]
    console.print(
        f"generated {len(hospitals)} hospitals: " + ", ".join(f"{h.site_id} ({h.n_patients})" for h in hospitals)
    )

    local_broker = None
    if broker is None:
        local_broker = LocalBroker(out / "broker", free_port()).start()
        host, port = "127.0.0.1", local_broker.port
        console.print(f"started Mosquitto on 127.0.0.1:{port}")
    else:
        host, port = broker
        console.print(f"using the MQTT broker at {host}:{port}")

    (out / "coordinator").mkdir()
    store = Store(f"sqlite:///{out / 'coordinator' / 'fhai.db'}")
    try:
        service = federate(out, task, sites, store, host, port, timeout_s)
    finally:
        if local_broker is not None:
            local_broker.stop()

    rows = metric_rows(store.evaluations(task.task))
    console.print(rounds_table(rows))
    console.print(sites_table(rows, rounds))

    # Baselines, on the same held-out patients each device used.
    profile = load_profile(DEVICE_PROFILE)
    spec = task.spec()
    splits = {
        site: split_table(
            build_feature_table(NdjsonDirSource(out / "hospitals" / site), spec), site, profile.holdout_fraction
        )
        for site in sites
    }
    epochs = rounds * int(TrainConfig(**{**task.train, **profile.train}).epochs)
    central, local = baselines(task, splits, epochs)
    X_hold = np.vstack([s.X_hold for s in splits.values()])
    y_hold = np.concatenate([s.y_hold for s in splits.values()])
    federated = service.manager.device_model  # what the devices hold and deploy
    assert federated is not None

    def score(m: Model) -> float:
        return auroc(y_hold, m.predict_proba(X_hold)[:, 1])

    result = DemoResult(
        auroc_federated=score(federated),
        auroc_centralized=score(central),
        auroc_local={site: score(m) for site, m in local.items()},
        rounds=rounds,
        seconds=time.monotonic() - started,
    )
    _report(result, rows, task, docs, bits)
    return result


def _report(result: DemoResult, rows: list[MetricRow], task: TaskDefinition, docs: Path, bits: int) -> None:
    table = Table(title="Pooled held-out AUROC: same model, same epochs")
    table.add_column("training")
    table.add_column("AUROC", justify="right")
    table.add_row("federated (FH-AI)", f"{result.auroc_federated:.4f}")
    table.add_row("centralized (pooled data)", f"{result.auroc_centralized:.4f}")
    for site, v in result.auroc_local.items():
        table.add_row(f"local only: {site}", f"{v:.4f}")
    table.add_row("local only: mean", f"{result.auroc_local_mean:.4f}")
    console.print(table)

    docs.mkdir(parents=True, exist_ok=True)
    plot = plot_rounds(rows, docs / "federation_rounds.png", f"{task.task}: held-out metrics per round")
    figures = {
        "auroc_federated": round(result.auroc_federated, 5),
        "auroc_centralized": round(result.auroc_centralized, 5),
        "auroc_local_mean": round(result.auroc_local_mean, 5),
        "auroc_local": {k: round(v, 5) for k, v in result.auroc_local.items()},
        "rounds": result.rounds,
        "update_bits": bits,
        "strategy": task.strategy,
        "model": task.model.model_dump(),
        "seconds": round(result.seconds, 1),
        "command": "make demo  (fhai-coordinator demo)",
    }
    (docs / "federation.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        "# Federated demo",
        "",
        f"`{figures['command']}`: 5 synthetic non-IID hospitals (one small), {result.rounds} rounds, "
        f"{bits}-bit updates, strategy `{task.strategy['name']}`, model hidden={task.model.hidden}.",
        "AUROC on the union of the sites' held-out patients; baselines use the same model and epochs.",
        "",
        "| training | AUROC |",
        "|---|---|",
        f"| federated | {result.auroc_federated:.4f} |",
        f"| centralized | {result.auroc_centralized:.4f} |",
        *(f"| local only: {k} | {v:.4f} |" for k, v in result.auroc_local.items()),
        f"| local only: mean | {result.auroc_local_mean:.4f} |",
        "",
        f"![rounds]({plot.name})",
        "",
    ]
    (docs / "federation.md").write_text("\n".join(lines))
    console.print(f"wrote {docs / 'federation.json'}, {docs / 'federation.md'} and {plot}")
