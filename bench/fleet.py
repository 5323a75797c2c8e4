"""Many devices on one machine: a simulated fleet against a real Mosquitto and a real coordinator process.

`fhai-edge simulate`'s fleet (one process, a few network threads) connects N devices; `fhai-coordinator run`
(its own process, SQLite store) runs a task whose cohort is drawn from all of them. Measured: how long the
fleet takes to connect, the simulator's peak RSS and thread count, each round's duration from the store, and
whether any device lost the broker. Updates are seeded noise (`--update noise`): this measures the transport
and the coordinator, not training.

    .venv/bin/python bench/fleet.py                      # 10,000 devices, cohort 1,000; writes docs/benchmarks/fleet.*
    .venv/bin/python bench/fleet.py --devices 500 --cohort 100 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--cohort", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="writes no docs")
    args = parser.parse_args()

    from coordinator.broker import LocalBroker, free_port
    from coordinator.demo import TASK_FILE
    from coordinator.store import Store
    from coordinator.task import load_task
    from edge_runtime.keys import load_or_create_signing_key, public_hex
    from edge_runtime.mqtt import BrokerSettings
    from edge_runtime.simulate import Fleet
    from edge_runtime.site_data import SourceConfig
    from fhir_adapters.synthetic import generate_hospitals

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.devices + 1024)), hard))
    root = Path(tempfile.mkdtemp(prefix="fhai-bench-fleet-"))
    hospital = generate_hospitals(1, seed=3, sizes=[400])[0]
    hospital.write_ndjson(root / "data")
    broker = LocalBroker(root / "broker", free_port()).start()
    work = root / "coordinator"
    key = load_or_create_signing_key(work / "coordinator.key")
    task = load_task(TASK_FILE).model_dump(mode="json")
    task.update(task="fleet", rounds=1, cohort_size=args.cohort, min_updates=args.cohort, round_deadline_s=600,
                cohort_wait_s=0, export={"formats": []})  # fmt: skip
    (work / "task.yaml").write_text(yaml.safe_dump(task))
    store_url = f"sqlite:///{work / 'fhai.db'}"
    settings = BrokerSettings("127.0.0.1", broker.port)
    t0 = time.perf_counter()
    fleet = Fleet(args.devices, "fleet", settings, public_hex(key), SourceConfig.parse(str(root / "data")),
                  threads=args.threads, state_dir=root / "sim")  # fmt: skip
    build_s = time.perf_counter() - t0
    Store(store_url).add_devices([(d.device_id, public_hex(d.key)) for d in fleet.devices])
    coordinator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "run",
            str(work / "task.yaml"),
            "--store",
            store_url,
            "--work-dir",
            str(work),
            "--broker",
            f"127.0.0.1:{broker.port}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(root / "coordinator.err").open("w"),
    )
    try:
        t0 = time.perf_counter()
        fleet.start(connect_timeout_s=600)
        connect_s = time.perf_counter() - t0
        connected = fleet.stats.connected
        threads = threading.active_count()
        t0 = time.perf_counter()
        finished = fleet.wait_final(1800)
        rounds_s = time.perf_counter() - t0
        coordinator.wait(timeout=300)
    finally:
        fleet.stop()
        if coordinator.poll() is None:
            coordinator.kill()
        broker.stop()
    rows = Store(store_url).rounds("fleet")
    report: dict[str, Any] = {
        "benchmark": "fleet",
        "command": " ".join(["python bench/fleet.py", *sys.argv[1:]]),
        "devices": args.devices,
        "cohort": args.cohort,
        "network_threads": args.threads,
        "finished": finished and coordinator.returncode == 0,
        "build_s": round(build_s, 1),
        "connect_s": round(connect_s, 1),
        "connected": connected,
        "rounds_s": round(rounds_s, 1),
        "round_s": {f"{r.round} ({r.phase})": round((r.closed_at or 0) - r.opened_at, 1) for r in rows},
        "accepted": {r.round: len(Store(store_url).accepted_devices("fleet", r.round)) for r in rows},
        "frames_sent": fleet.stats.sent,
        "disconnects": fleet.stats.disconnects,
        "simulator_threads": threads,
        "simulator_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "broker_timeouts": (broker.log_file.read_text().count("exceeded timeout")),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    print(json.dumps(report, indent=2))
    if not args.quick:
        (DOCS / "fleet.json").write_text(json.dumps(report, indent=2) + "\n")
        (DOCS / "fleet.md").write_text(
            "# Fleet benchmark\n\n"
            f"{args.devices:,} simulated devices (`fhai-edge simulate`'s fleet: one process, {args.threads} network "
            f"threads) against a real Mosquitto and `fhai-coordinator run` (SQLite), cohort {args.cohort:,}, one "
            f"training round (seeded-noise updates). Command: `{report['command']}`.\n\n"
            "| figure | value |\n|---|---:|\n"
            + "".join(f"| {k} | {report[k]} |\n" for k in ("finished", "build_s", "connect_s", "rounds_s",
                      "frames_sent", "disconnects", "broker_timeouts", "simulator_threads", "simulator_peak_rss_mb"))
            + f"\nRounds (open to close, s): {report['round_s']}; accepted per round: {report['accepted']}.\n"
            + "`connect_s`: until every device had its CONNACK (rounds start as soon as a cohort is online, so they overlap it); `rounds_s`: from then until the fleet had sent its final evaluations; each round's own duration, open to close, is on the line above.\n"
            f"Machine: {report['machine']}.\n"
        )  # fmt: skip


if __name__ == "__main__":
    main()
