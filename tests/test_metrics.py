"""Prometheus metrics scraped over HTTP from a running federation on a real Mosquitto, checked against the store."""

from __future__ import annotations

from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.broker import LocalBroker
from edge_runtime import wire
from fhir_adapters.features import build_feature_table
from fhir_adapters.sources import NdjsonDirSource
from tests.harness import Federation, wait_for

pytestmark = pytest.mark.timeout(300)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def send_garbage(port: int, topic: str) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="garbage", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(topic, b"\x00not a frame", qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_coordinator_and_gateway_metrics_match_the_federation(
    tmp_path: Path, broker: LocalBroker, three_sites: dict[str, Path]
) -> None:
    fed = Federation(tmp_path / "fed", broker, three_sites, "metered", rounds=2)
    fed.enroll_all()
    task = fed.task.task
    try:
        fed.start_coordinator_thread(metrics=True)
        port = fed.metrics_ports["coordinator"]
        before = scrape(port)  # served before any device: the task exists, nothing counted yet
        assert value(before, "fhai_coordinator_updates_accepted_total", task=task, kind="update") == 0
        assert value(before, "fhai_coordinator_devices_online", task=task) == 0
        fed.start_devices(metrics=True)
        wait_for(lambda: value(scrape(port), "fhai_coordinator_devices_online", task=task) == 3, 60, "3 online")
        wait_for(
            lambda: value(scrape(port), "fhai_coordinator_rounds_committed_total", task=task, phase="stats") == 1,
            120,
            "the stats round",
        )
        send_garbage(broker.port, wire.update_topic(task, "site-a"))
        fed.wait_done()
        final = scrape(port)
        sites = {site: scrape(p) for site, p in fed.metrics_ports.items() if site != "coordinator"}
    finally:
        fed.stop()

    store = fed.store
    rounds = store.rounds(task)
    for phase in ("stats", "train", "eval"):
        committed = sum(1 for r in rounds if r.phase == phase and r.status == "committed")
        assert value(final, "fhai_coordinator_rounds_committed_total", task=task, phase=phase) == committed
    accepted = [u for r in rounds for u in store.accepted(task, r.round)]
    for kind in ("stats", "update"):
        mine = [u for u in accepted if u.kind == kind]
        assert value(final, "fhai_coordinator_updates_accepted_total", task=task, kind=kind) == len(mine) > 0
        assert value(final, "fhai_coordinator_accepted_bytes_total", task=task, kind=kind) == sum(
            len(u.body) for u in mine
        )
    codes: dict[str, int] = {}
    for x in store.rejections(task):
        codes[x.code] = codes.get(x.code, 0) + 1
    assert codes, "the garbage frame was not rejected"
    for code, n in codes.items():
        assert value(final, "fhai_coordinator_updates_rejected_total", task=task, code=code) == n
    # What only the process counts: every message's bytes and handling time.
    received = value(final, "fhai_coordinator_received_bytes_total", task=task, kind="updates")
    assert received > sum(len(u.body) for u in accepted)  # bodies plus headers, signatures and the garbage
    assert value(final, "fhai_coordinator_handle_seconds_count", task=task, kind="updates") == len(accepted) + 1
    assert value(final, "fhai_coordinator_round_close_seconds_count", task=task) == sum(
        1 for r in rounds if r.phase != "eval"
    )
    assert value(final, "fhai_coordinator_round", task=task) == rounds[-1].round

    spec = fed.task.spec()
    for site, samples in sites.items():
        labels = {"device": site, "task": task}
        trained = [u for u in accepted if u.device_id == site and u.kind == "update"]
        assert value(samples, "fhai_edge_train_seconds_count", **labels) == len(trained) == fed.task.rounds
        assert value(samples, "fhai_edge_trained_rows_total", **labels) == sum(u.n_samples for u in trained)
        rows = len(build_feature_table(NdjsonDirSource(three_sites[site]), spec).patient_ids)
        assert value(samples, "fhai_edge_rows", **labels) == rows
        assert value(samples, "fhai_edge_sync_seconds_count", **labels) >= 1


def test_a_taken_metrics_port_is_one_clear_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge_runtime.cli import app as edge_app
    from edge_runtime.keys import load_or_create_signing_key, public_hex
    from edge_runtime.monitoring import EdgeMetrics

    taken = EdgeMetrics("d", "t")
    port = taken.serve(0)
    try:
        key = public_hex(load_or_create_signing_key(tmp_path / "c.key"))
        result = CliRunner().invoke(
            edge_app,
            ["run", "--task", "t", "--device-id", "d", "--coordinator-key", key, "--source", str(tmp_path),
             "--state-dir", str(tmp_path / "s"), "--metrics-port", str(port)],
        )  # fmt: skip
    finally:
        taken.close()
    assert result.exit_code == 2 and "FHAI-O402" in result.output and "--metrics-port" in result.output
