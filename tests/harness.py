"""A small federation on a real Mosquitto for the tests: synthetic hospitals as ndjson, edge agents in
threads (each with its own MQTT session), the coordinator in a thread or in its own process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from coordinator.broker import LocalBroker
from coordinator.demo import TASK_FILE
from coordinator.metrics import CoordinatorMetrics
from coordinator.service import CoordinatorService
from coordinator.store import Store
from coordinator.task import TaskDefinition, load_task
from edge_runtime.agent import AgentConfig, EdgeAgent, LocalSplit
from edge_runtime.keys import load_or_create_signing_key, public_hex
from edge_runtime.messages import Announcement
from edge_runtime.monitoring import EdgeMetrics
from edge_runtime.mqtt import BrokerSettings
from edge_runtime.profile import load_profile
from edge_runtime.site_data import SourceConfig


class GatedAgent(EdgeAgent):
    """A real agent whose update for `hold_round` waits until the test opens the gate.

    It lets a test act at a known point of a round (inject frames, kill the coordinator) without sleeps.
    """

    def __init__(self, cfg: AgentConfig, hold_round: int | None = None, hang: bool = False) -> None:
        super().__init__(cfg)
        self.hold_round = hold_round
        self.hang = hang  # never send that round's update: a device that died mid-round
        self.reached = threading.Event()
        self.gate = threading.Event()
        self.adopted: list[tuple[int, str]] = []  # (round, version) of each global model it came to hold

    def _save_held(self) -> None:
        held = self.follower.held
        assert held is not None
        self.adopted.append((held.round, held.model.version()))
        super()._save_held()

    def _send_update(self, ann: Announcement, split: LocalSplit) -> None:
        if ann.round == self.hold_round:
            self.reached.set()
            self.gate.wait(120)
            if self.hang:
                self.finished.set()  # leaves without a word; the broker's Will is not sent on a clean exit
                return
        super()._send_update(ann, split)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Federation:
    def __init__(
        self,
        root: Path,
        broker: LocalBroker,
        hospitals: dict[str, Path | SourceConfig],
        task_id: str,
        store_url: str | None = None,
        **overrides: Any,
    ) -> None:
        self.root = root
        self.broker = broker
        self.hospitals = hospitals
        data = load_task(TASK_FILE).model_dump()
        data.update(
            task=task_id,
            rounds=2,
            cohort_size=len(hospitals),
            min_updates=len(hospitals),
            round_deadline_s=60,
            cohort_wait_s=0,
            retention={"update_bodies_rounds": None},  # the tests re-aggregate every round from its bodies
        )
        data.update(overrides)
        self.task = TaskDefinition.model_validate(data)
        self.work = root / "coordinator"
        self.work.mkdir(parents=True, exist_ok=True)
        self.store_url = store_url or f"sqlite:///{self.work / 'fhai.db'}"
        self.store = Store(self.store_url)
        self.key = load_or_create_signing_key(self.work / "coordinator.key")
        self.agents: dict[str, GatedAgent] = {}
        self.threads: list[threading.Thread] = []
        self.stop_event = threading.Event()
        self.service: CoordinatorService | None = None
        self.coordinator_status: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_ports: dict[str, int] = {}

    @property
    def settings(self) -> BrokerSettings:
        return BrokerSettings("127.0.0.1", self.broker.port)

    def device_key_path(self, site: str) -> Path:
        return self.root / "devices" / site / "device.key"

    def enroll_all(self) -> None:
        for site in self.hospitals:
            self.store.add_device(site, public_hex(load_or_create_signing_key(self.device_key_path(site))), site)

    def start_devices(self, only: list[str] | None = None, *, metrics: bool = False, **gates: dict[str, Any]) -> None:
        """Start every site's agent (or those in `only`); gates[site] = GatedAgent keyword arguments for that site.

        With `metrics`, each agent serves Prometheus metrics on a free port (self.metrics_ports[site])."""
        for site, folder in self.hospitals.items():
            if only is not None and site not in only:
                continue
            cfg = AgentConfig(
                device_id=site,
                task=self.task.task,
                state_dir=self.device_key_path(site).parent,
                source=folder if isinstance(folder, SourceConfig) else SourceConfig.parse(str(folder)),
                profile=load_profile("gateway"),
                coordinator_key=public_hex(self.key),
                broker=self.settings,
                retry_s=1.0,
            )
            if metrics:
                cfg.metrics = EdgeMetrics(site, self.task.task)
                self.metrics_ports[site] = cfg.metrics.serve(0)
            agent = GatedAgent(cfg, **gates.get(site, {}))
            self.agents[site] = agent
            t = threading.Thread(target=agent.run, args=(self.stop_event,), name=f"agent-{site}", daemon=True)
            t.start()
            self.threads.append(t)

    def start_coordinator_thread(self, timeout_s: float = 120, metrics: bool = False) -> None:
        self.service = CoordinatorService(self.store, self.task, self.key, self.settings, self.work)
        if metrics:
            self.service.metrics = CoordinatorMetrics(self.service.manager)
            self.metrics_ports["coordinator"] = self.service.metrics.serve(0)

        def run() -> None:
            assert self.service is not None
            self.coordinator_status = self.service.run(self.stop_event, timeout_s=timeout_s)

        t = threading.Thread(target=run, name="coordinator", daemon=True)
        t.start()
        self.threads.append(t)

    def start_coordinator_process(self) -> subprocess.Popen[bytes]:
        task_file = self.work / "task.yaml"
        task_file.write_text(yaml.safe_dump(self.task.model_dump(mode="json")))
        cmd = [
            sys.executable, "-m", "coordinator.cli", "run", str(task_file),
            "--store", self.store_url, "--work-dir", str(self.work),
            "--broker", f"127.0.0.1:{self.broker.port}",
        ]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(self.work / "stderr.log").open("ab"))
        return self.process

    def task_status(self) -> str | None:
        row = self.store.get_task(self.task.task)
        return row.status if row else None

    def wait_done(self, timeout: float = 120) -> None:
        wait_for(lambda: self.task_status() in ("done", "failed"), timeout, f"task {self.task.task} to end")
        assert self.task_status() == "done", self.store.rejections(self.task.task)

    def stop(self) -> None:
        self.stop_event.set()
        for agent in self.agents.values():
            agent.gate.set()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for t in self.threads:
            t.join(timeout=15)
        for agent in self.agents.values():
            if agent.cfg.metrics is not None:
                agent.cfg.metrics.close()
        if self.service is not None and self.service.metrics is not None:
            self.service.metrics.close()
