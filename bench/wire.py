"""Bytes on the wire, measured at the broker, for the demo federation and a 1M-parameter variant.

Each case runs the demo's federation (five synthetic hospitals, each edge runtime its own process, the
coordinator here; `coordinator.demo.federate`) over a Mosquitto started with `sys_interval 1`, and reads
the broker's own counters `$SYS/broker/bytes/received` and `$SYS/broker/bytes/sent` before and after.
A monitor subscribed (QoS 0) to `fhai/#` sees one copy of every publish and sizes its MQTT packet from
the topic, properties and payload, per topic. The broker's totals include the coordinator's and the
monitor's traffic; those packets are sized from what the monitor saw (the coordinator receives each
device publish at QoS 1: the monitor's packet + 2 bytes of packet id, and answers with a 4-byte PUBACK; it
publishes each downlink frame at QoS 1 and gets a 4-byte PUBACK), and subtracted, so what remains is the
devices' traffic in each direction, MQTT framing, connects and keepalives included.

Flower's default path is the arithmetic it implies for the same model: the whole float32 model down and a
float32 update up per device per round (4 bytes per parameter each way, before any framing).

    .venv/bin/python bench/wire.py            # writes docs/benchmarks/wire.{json,md}
    .venv/bin/python bench/wire.py --quick    # fewer rounds, no files
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.broker import CONFIG_DIR, MAX_PACKET_BYTES, free_port, start_mosquitto, stop_mosquitto  # noqa: E402
from coordinator.demo import DEVICE_PROFILE, demo_task, federate  # noqa: E402
from coordinator.report import POOLED, metric_rows  # noqa: E402
from coordinator.store import Store  # noqa: E402
from coordinator.task import TaskDefinition  # noqa: E402
from edge_runtime.console import console  # noqa: E402
from edge_runtime.profile import PROFILE_DIR  # noqa: E402
from fhir_adapters.synthetic import generate_hospitals  # noqa: E402

SITES = 5
SEED = 7
RUN = int(time.time())
DEVICE_TOPICS = ("updates/+", "eval/+", "devices/+/status")  # what devices publish (the coordinator receives)
PUBACK = 4  # MQTT v5 PUBACK, reason 0, no properties: fixed header 2 + packet id 2


def varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def publish_packet_len(topic: str, payload_len: int, props_len: int, qos: int) -> int:
    """Bytes of an MQTT v5 PUBLISH packet: fixed header, topic, packet id (QoS > 0), properties, payload."""
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + props_len + payload_len
    return 1 + varint_len(rest) + rest


@dataclass
class Monitor:
    """Watches the broker's $SYS byte counters and sizes every FH-AI publish, per topic."""

    port: int
    counters: dict[str, int] = field(default_factory=dict)
    updated: threading.Event = field(default_factory=threading.Event)
    topics: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))  # n, payload, packet
    received_by_monitor: int = 0

    def start(self) -> Monitor:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fhai-wire-bench", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.subscribe([("$SYS/broker/bytes/#", 0), ("fhai/#", 0)])
        self.client.loop_start()
        return self

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties.pack() if msg.properties is not None else b"\x00"
        size = publish_packet_len(msg.topic, len(msg.payload), len(props), msg.qos)
        self.received_by_monitor += size
        if msg.topic.startswith("$SYS/"):
            self.counters[msg.topic.rsplit("/", 1)[-1]] = int(msg.payload)
            self.updated.set()
            return
        entry = self.topics[topic_class(msg.topic)]
        entry[0] += 1
        entry[1] += len(msg.payload)
        entry[2] += size

    def settle(self) -> dict[str, int]:
        """The counters after the next $SYS update (sys_interval 1 s), once traffic has stopped."""
        time.sleep(1.5)
        self.updated.clear()
        self.updated.wait(5)
        return dict(self.counters)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def topic_class(topic: str) -> str:
    """fhai/v1/tasks/<task>/updates/<device> -> updates/+; per-device levels folded, the task level dropped."""
    parts = topic.split("/")
    if parts[2] == "devices":
        return "devices/+/status"
    rest = parts[4:]
    if rest[0] in ("updates", "eval"):
        return f"{rest[0]}/+"
    return "/".join(rest)


def broker_conf(workdir: Path, port: int) -> Path:
    template = (CONFIG_DIR / "mosquitto-dev.conf").read_text()
    conf = workdir / "mosquitto.conf"
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    conf.write_text(
        template.format(
            port=port,
            user=getpass.getuser(),
            data_dir=workdir / "data",
            log_file=workdir / "mosquitto.log",
            max_packet_size=MAX_PACKET_BYTES,
        )
        + "sys_interval 1\n"  # $SYS counters every second
    )
    return conf


@dataclass(frozen=True)
class Case:
    task: TaskDefinition
    epochs: int | None  # local epochs, in the devices' profile (a profile's epochs win over the task's)


def case(name: str, rounds: int, downlink_bits: int, hidden: list[int], epochs: int | None = None) -> Case:
    """A demo task; cases of the same `name` share the task id, hence every device's training seeds."""
    task = demo_task(rounds, 8, f"wire-{name}-{RUN}")
    data = task.model_dump()
    data["downlink"] = {**data["downlink"], "bits": downlink_bits}
    data["model"] = {**data["model"], "hidden": hidden}
    data.update(cohort_size=SITES, min_updates=SITES, cohort_wait_s=60, round_deadline_s=600)
    return Case(TaskDefinition.model_validate(data), epochs)


def device_profile(out: Path, epochs: int | None) -> str:
    """The demo's gateway profile, with fewer local epochs when the case asks (the 1M model on 2 shared cores)."""
    if epochs is None:
        return DEVICE_PROFILE
    data = yaml.safe_load((PROFILE_DIR / f"{DEVICE_PROFILE}.yaml").read_text())
    data["train"] = {**data.get("train", {}), "epochs": epochs}
    path = out / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run_case(name: str, spec: Case, work: Path) -> dict[str, Any]:
    task = spec.task
    out = work / name
    out.mkdir(parents=True)
    hospitals = generate_hospitals(SITES, seed=SEED)
    for h in hospitals:
        h.write_ndjson(out / "hospitals" / h.site_id)
    sites = [h.site_id for h in hospitals]
    port = free_port()
    broker = start_mosquitto(broker_conf(out / "broker", port), port)
    monitor = Monitor(port).start()
    try:
        monitor.updated.wait(5)
        before = monitor.settle()
        monitor_before = monitor.received_by_monitor
        (out / "coordinator").mkdir()
        store = Store(f"sqlite:///{out / 'coordinator' / 'fhai.db'}")
        started = time.monotonic()
        service = federate(out, task, sites, store, "127.0.0.1", port, 3600, device_profile(out, spec.epochs))
        seconds = time.monotonic() - started
        after = monitor.settle()
        monitor_share = monitor.received_by_monitor - monitor_before
    finally:
        monitor.stop()
        stop_mosquitto(broker)
    received = after["received"] - before["received"]
    sent = after["sent"] - before["sent"]
    topics = {k: list(v) for k, v in sorted(monitor.topics.items())}
    device_pub = sum(v[2] for k, v in topics.items() if k in DEVICE_TOPICS)
    device_msgs = sum(v[0] for k, v in topics.items() if k in DEVICE_TOPICS)
    coord_pub = sum(v[2] for k, v in topics.items() if k not in DEVICE_TOPICS)
    coord_msgs = sum(v[0] for k, v in topics.items() if k not in DEVICE_TOPICS)
    # The coordinator's share of each counter: its QoS 1 publishes and PUBACKs, its deliveries and PUBACKs.
    coord_up = coord_pub + 2 * coord_msgs + PUBACK * device_msgs
    coord_down = device_pub + 2 * device_msgs + PUBACK * coord_msgs
    up = received - coord_up
    down = sent - coord_down - monitor_share
    manager = service.manager
    assert manager.model is not None and manager.device_model is not None
    n_params = manager.model.params.size
    per = SITES * task.rounds
    pooled = {r.round: r.auroc for r in metric_rows(store.evaluations(task.task)) if r.site == POOLED}
    logs = [(out / "devices" / site / "edge.log").read_text() for site in sites]
    result = {
        "reconnects": sum(log.count(" connected to ") - 1 for log in logs),  # a reconnect re-sends nothing big now
        "catch_ups": sum(log.count("catching up on the global model") for log in logs),
        "params": n_params,
        "rounds": task.rounds,
        "devices": SITES,
        "downlink_bits": task.downlink.bits,
        "uplink_bits": task.codec.bits,
        "broker_bytes_received": received,
        "broker_bytes_sent": sent,
        "coordinator_bytes_to_broker": coord_up,
        "coordinator_bytes_from_broker": coord_down,
        "monitor_bytes_from_broker": monitor_share,
        "up_per_device_round": up / per,
        "down_per_device_round": down / per,
        "total_per_device_round": (up + down) / per,
        "flower_per_device_round": 2 * 4 * n_params,
        "float32_down_per_device_round": 4 * n_params,
        "pooled_auroc_final": pooled.get(task.rounds),
        "pooled_auroc_by_round": pooled,
        "topics": {k: {"messages": v[0], "payload_bytes": v[1], "packet_bytes": v[2]} for k, v in topics.items()},
        "seconds": round(seconds, 1),
    }
    result["total_over_flower"] = result["total_per_device_round"] / result["flower_per_device_round"]
    result["down_over_float32"] = result["down_per_device_round"] / result["float32_down_per_device_round"]
    result["up_over_float32"] = result["up_per_device_round"] / (4 * n_params)
    console.print(
        f"[bold]{name}[/]: {n_params:,} params, up {result['up_per_device_round']:,.0f} B, down "
        f"{result['down_per_device_round']:,.0f} B per device per round; total / Flower {result['total_over_flower']:.3f}, "
        f"down / float32 {result['down_over_float32']:.3f}, pooled AUROC {result['pooled_auroc_final']}"
    )
    return result


def write_docs(results: dict[str, Any], figures: dict[str, Any], docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "wire.json").write_text(json.dumps({**figures, "cases": results}, indent=2) + "\n")
    lines = [
        "# Bytes on the wire",
        "",
        f"`{figures['command']}`. Five synthetic hospitals (the demo's, seed {SEED}), every device in every round, "
        "edge runtimes as processes, a real Mosquitto. Bytes per device per training round, from the broker's "
        "`$SYS/broker/bytes/received` (up) and `sent` (down) counters less the coordinator's and the monitor's "
        "packets (sized from what a QoS 0 monitor on `fhai/#` saw), over the whole task: stats round, final "
        "evaluation round, connects, keepalives, exports and MQTT framing included. Flower: a float32 model down "
        "and a float32 update up per device per round, 4 bytes per parameter each way, no framing. The demo's "
        "model has 19 parameters, so its frames are mostly headers (the announcement carries the feature spec, "
        "an evaluation two 1000-bin histograms): its ratios say nothing about payloads, its AUROC is the point. "
        "Both demo cases share the task id, hence every device's training seeds: the downlink is the only "
        "difference between them.",
        "",
        "| case | params | downlink | up B | down B | total B | Flower B | total / Flower | down / float32 | pooled AUROC |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        auroc = "" if r["pooled_auroc_final"] is None else f"{r['pooled_auroc_final']:.4f}"
        lines.append(
            f"| {name} | {r['params']:,} | {r['downlink_bits']}-bit | {r['up_per_device_round']:,.0f} | "
            f"{r['down_per_device_round']:,.0f} | {r['total_per_device_round']:,.0f} | "
            f"{r['flower_per_device_round']:,} | {r['total_over_flower']:.3f} | {r['down_over_float32']:.3f} | {auroc} |"
        )
    lines += [
        "",
        "Headline: " + ", ".join(f"`{k}` = {v}" for k, v in figures.items() if k not in ("command", "machine")) + ".",
        "",
        "## Payload per topic (all messages of the run; packet = MQTT PUBLISH as delivered to one subscriber)",
        "",
    ]
    for name, r in results.items():
        lines += [f"### {name}", "", "| topic | messages | payload bytes | packet bytes |", "|---|---:|---:|---:|"]
        for topic, t in r["topics"].items():
            lines.append(f"| `{topic}` | {t['messages']} | {t['payload_bytes']:,} | {t['packet_bytes']:,} |")
        lines.append("")
    lines.append(f"Machine: {figures['machine']}.")
    (docs / "wire.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, no files")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    demo_rounds, big_rounds = (3, 2) if args.quick else (10, 10)
    cases = {
        # Same task id, so the same training seeds on every device: the downlink is the only difference.
        "demo_8bit_down": case("demo", demo_rounds, 8, []),
        "demo_float32_down": case("demo", demo_rounds, 32, []),
        "mlp_1m_8bit_down": case("mlp1m", big_rounds, 8, [1000, 1000], epochs=1),
    }
    work = Path(tempfile.mkdtemp(prefix="fhai-wire-"))
    try:
        results = {name: run_case(name, c, work) for name, c in cases.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    big, q, f = results["mlp_1m_8bit_down"], results["demo_8bit_down"], results["demo_float32_down"]
    figures = {
        "total_over_flower_1m": round(big["total_over_flower"], 4),
        "downlink_over_float32_1m": round(big["down_over_float32"], 4),
        "uplink_over_float32_1m": round(big["up_over_float32"], 4),
        "auroc_quantized_downlink": round(q["pooled_auroc_final"], 5),
        "auroc_float32_downlink": round(f["pooled_auroc_final"], 5),
        "auroc_delta_quantized_downlink": round(q["pooled_auroc_final"] - f["pooled_auroc_final"], 5),
        "command": ".venv/bin/python bench/wire.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
    }
    console.print_json(json.dumps(figures))
    if not args.quick:
        write_docs(results, figures, args.docs)


if __name__ == "__main__":
    main()
