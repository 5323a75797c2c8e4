"""Start and stop a local Mosquitto for the demo and the tests, from the project's config template."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import CoordinatorError
from edge_runtime import configs

MAX_PACKET_BYTES = 64 * 1024 * 1024


def broker_template(name: str) -> str:
    """A Mosquitto config template (broker/NAME.conf) from the config folders or the package."""
    return configs.find("broker", name, ".conf").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise CoordinatorError(
            "FHAI-B010", "mosquitto is not installed: run `apt-get install mosquitto` (or `make setup`)"
        )
    return found


@dataclass
class LocalBroker:
    """A Mosquitto process on 127.0.0.1:port with its data and log under `workdir`."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        template = broker_template("mosquitto-dev")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            template.format(
                port=self.port,
                user=getpass.getuser(),
                data_dir=self.workdir / "data",
                log_file=self.log_file,
                max_packet_size=MAX_PACKET_BYTES,
            )
        )
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise CoordinatorError("FHAI-B011", f"mosquitto exited at start: {err.strip() or self.log_file}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise CoordinatorError("FHAI-B012", f"mosquitto did not listen on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        """SIGTERM, so Mosquitto writes its persistence file (sessions, retained messages)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_local_broker(workdir: Path, port: int | None = None) -> LocalBroker:
    return LocalBroker(workdir, port or free_port()).start()


def start_mosquitto(
    config: Path, port: int, host: str = "127.0.0.1", log_file: Path | None = None, timeout_s: float = 10.0
) -> subprocess.Popen[bytes]:
    """Start Mosquitto on a ready-made config (e.g. `fhai-coordinator init`'s) and wait until host:port listens.

    umask 077: what the broker writes (the dynamic-security JSON with its password hashes, persistence)
    is readable by its owner only.
    """
    process = subprocess.Popen(
        [mosquitto_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, umask=0o077
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode() if process.stderr else ""
            raise CoordinatorError("FHAI-B011", f"mosquitto exited at start: {err.strip() or log_file or config}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    stop_mosquitto(process)
    raise CoordinatorError("FHAI-B012", f"mosquitto did not listen on {host}:{port} within {timeout_s}s")


def stop_mosquitto(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, so Mosquitto writes its persistence file; SIGKILL if it does not exit within 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
