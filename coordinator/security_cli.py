"""The coordinator's security commands: `init`, `broker`, `tokens create|list`, `enroll-service`, and the
broker side of `devices revoke`. Registered on coordinator/cli.py's app by register_security_commands."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.table import Table

from coordinator.store import Store
from edge_runtime.console import console, friendly_errors, setup_logging

BrokerDirOpt = Annotated[Path, typer.Option("--broker-dir", help="Broker folder made by `fhai-coordinator init`")]
DEFAULT_BROKER_DIR = Path("state/broker")
# Module level: typer resolves the (string) annotations in the module's namespace.
StoreOpt = Annotated[str, typer.Option("--store", help="SQLAlchemy URL of the coordinator store")]
WorkDirOpt = Annotated[Path, typer.Option("--work-dir", help="Coordinator key, spill files and logs")]


def revoke_broker_account(broker_dir: Path, device_id: str, plain: bool = False) -> None:
    """Delete the device's broker account and role; the broker ends its live session at once."""
    from coordinator.dynsec import DynsecAdmin
    from coordinator.security import BrokerDir

    with DynsecAdmin(BrokerDir.load(broker_dir).settings("admin", plain=plain)) as admin:
        admin.delete_device(device_id)


@contextlib.contextmanager
def enrollment_in_background(
    broker_dir: Path, store: Store, key: Ed25519PrivateKey, plain: bool = False
) -> Iterator[threading.Event]:
    """Answer enrollment requests in a thread while the block runs (`run --enroll`, `enroll-service`).

    Yields the event that stops the service; leaving the block sets it and waits for the thread.
    """
    from coordinator.dynsec import DynsecAdmin
    from coordinator.enrollment import EnrollmentService
    from coordinator.security import BrokerDir

    layout = BrokerDir.load(broker_dir)
    settings = layout.settings("admin", plain=plain)
    stop, ready = threading.Event(), threading.Event()
    with DynsecAdmin(settings) as admin:
        service = EnrollmentService(store, key, admin, settings, bootstrap_user=layout.username("bootstrap"))
        service.sync_bootstrap()  # open the bootstrap window now if a token is live: "running" means usable

        def serve() -> None:
            try:
                service.run(stop, ready)
            except Exception:  # the rounds go on; the log says why enrollment stopped
                logging.getLogger("fhai.enrollment").exception("the enrollment service stopped")
                ready.set()

        thread = threading.Thread(target=serve, name="enrollment", daemon=True)
        thread.start()
        ready.wait(30)
        logging.getLogger("fhai.enrollment").info("enrollment service on %s:%d", settings.host, settings.port)
        try:
            yield stop
        finally:
            stop.set()
            thread.join(15)


def register_security_commands(
    app: typer.Typer, default_store: str, open_store: Callable[[str], Store], default_work_dir: Path
) -> None:
    tokens_app = typer.Typer(help="One-time enrollment tokens")
    app.add_typer(tokens_app, name="tokens")

    @app.command()
    @friendly_errors
    def init(
        folder: Annotated[
            Path, typer.Option("--dir", help="Folder for the broker's CA, certificate, config and secrets")
        ] = DEFAULT_BROKER_DIR,
        host: Annotated[
            str, typer.Option(help="Name or address devices use to reach the broker (in the certificate)")
        ] = "127.0.0.1",
        tls_port: Annotated[int, typer.Option(help="TLS listener port")] = 8883,
        plain_port: Annotated[
            int | None, typer.Option(help="Also a plain listener on 127.0.0.1 (coordinator on this host only)")
        ] = None,
        bind: Annotated[str, typer.Option(help="Address the TLS listener binds to")] = "0.0.0.0",
        san: Annotated[
            list[str] | None, typer.Option(help="More names or addresses for the certificate (repeatable)")
        ] = None,
        plugin: Annotated[str | None, typer.Option(help="Path of mosquitto_dynamic_security.so")] = None,
        work_dir: WorkDirOpt = default_work_dir,
    ) -> None:
        """Create a CA, the broker's TLS certificate, its Mosquitto config with dynamic security, and the
        admin, coordinator and bootstrap accounts (secrets mode 0600)."""
        from coordinator.security import init_broker_dir
        from edge_runtime.keys import load_or_create_signing_key, public_hex

        layout = init_broker_dir(folder, host, tls_port, plain_port, bind, plugin, tuple(san or ()))
        coordinator_key = public_hex(load_or_create_signing_key(work_dir / "coordinator.key"))
        table = Table(title=f"Broker folder {layout.root}", show_header=False)
        table.add_row("start the broker", f"fhai-coordinator broker --dir {folder}")
        table.add_row("TLS listener", f"{host}:{tls_port} (bound to {bind})")
        if plain_port is not None:
            table.add_row("plain listener", f"127.0.0.1:{plain_port} (loopback, credentials required)")
        table.add_row("give every device", f"{layout.ca_file}, {layout.password_file('bootstrap')}, a token")
        table.add_row("bootstrap user", layout.username("bootstrap"))
        table.add_row("coordinator user", f"{layout.username('coordinator')} ({layout.password_file('coordinator')})")
        table.add_row("CA key", f"{layout.secrets / 'ca.key'}: move it offline; only re-issuing certificates needs it")
        console.print(table)
        console.print(f"coordinator public key (devices pin it with --coordinator-key):\n{coordinator_key}")

    @app.command("renew-cert")
    @friendly_errors
    def renew_cert(
        folder: Annotated[
            Path, typer.Option("--dir", help="Broker folder made by `fhai-coordinator init`")
        ] = DEFAULT_BROKER_DIR,
        days: Annotated[int, typer.Option(min=1, max=825, help="Validity in days")] = 730,
    ) -> None:
        """Issue the broker a new TLS key and certificate from its CA (restart the broker afterwards)."""
        from coordinator.security import renew_server_certificate

        cert = renew_server_certificate(folder, days)
        console.print(f"new server certificate, valid until {cert.not_valid_after_utc:%Y-%m-%d}: restart the broker")

    @app.command()
    @friendly_errors
    def broker(
        folder: Annotated[
            Path, typer.Option("--dir", help="Broker folder made by `fhai-coordinator init`")
        ] = DEFAULT_BROKER_DIR,
    ) -> None:
        """Run the broker of an `init` folder in the foreground (Ctrl-C stops it)."""
        from coordinator.broker import start_mosquitto, stop_mosquitto
        from coordinator.security import BrokerDir

        layout = BrokerDir.load(folder)
        process = start_mosquitto(layout.config_file, layout.tls_port, "127.0.0.1", layout.log_file)
        console.print(f"mosquitto running (pid {process.pid}), log: {layout.log_file}")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.is_set() and process.poll() is None:
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            stop_mosquitto(process)
        if process.returncode not in (0, -signal.SIGTERM):
            console.print(f"[bold red]mosquitto exited with {process.returncode}[/]: see {layout.log_file}")
            raise typer.Exit(1)

    @tokens_app.command("create")
    @friendly_errors
    def tokens_create(
        site: Annotated[str, typer.Option(help="Hospital / site the enrolled devices belong to")],
        count: Annotated[int, typer.Option(min=1, max=1000, help="How many tokens")] = 1,
        ttl: Annotated[str, typer.Option(help="Lifetime: 90s, 30m, 24h, 7d")] = "24h",
        store: StoreOpt = default_store,
    ) -> None:
        """Print COUNT one-time enrollment tokens for SITE, one per line (only their hashes are kept)."""
        from coordinator.enrollment import create_tokens, parse_ttl

        ttl_s = parse_ttl(ttl)
        tokens = create_tokens(open_store(store), site, count, ttl_s)
        console.print(f"{count} token(s) for site [bold]{site}[/], valid until {time.ctime(time.time() + ttl_s)}")
        for token in tokens:
            print(token)

    @tokens_app.command("list")
    @friendly_errors
    def tokens_list(store: StoreOpt = default_store) -> None:
        """Tokens by state (the tokens themselves are not stored, so they cannot be shown again)."""
        now = time.time()
        table = Table(title="Enrollment tokens")
        for col in ("hash", "site", "state", "expires", "device"):
            table.add_column(col)
        for t in open_store(store).tokens():
            state = "used" if t.used_at is not None else ("expired" if t.expires_at <= now else "live")
            table.add_row(t.token_hash[:12], t.site, state, time.ctime(t.expires_at), t.device_id or "")
        console.print(table)

    @tokens_app.command("expire")
    @friendly_errors
    def tokens_expire(
        hash_prefix: Annotated[str, typer.Argument(help="Start of the token's hash, as `tokens list` shows it")],
        store: StoreOpt = default_store,
    ) -> None:
        """Make an unused token useless now (lost, sent to the wrong person)."""
        n = open_store(store).expire_tokens(hash_prefix, time.time())
        if n == 0:
            raise typer.BadParameter(f"no live token's hash starts with {hash_prefix!r}")
        console.print(f"{n} token(s) expired")

    @app.command("enroll-service")
    @friendly_errors
    def enroll_service(
        broker_dir: BrokerDirOpt = DEFAULT_BROKER_DIR,
        store: StoreOpt = default_store,
        work_dir: WorkDirOpt = default_work_dir,
        plain: Annotated[bool, typer.Option(help="Connect through the loopback plain listener")] = False,
        verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
    ) -> None:
        """Answer enrollment requests: check the token, create the device's broker account and register its key.

        `fhai-coordinator run --enroll` does the same inside the coordinator's process."""
        from edge_runtime.keys import load_or_create_signing_key

        setup_logging(work_dir / "enrollment.log", verbose)
        key = load_or_create_signing_key(work_dir / "coordinator.key")
        with enrollment_in_background(broker_dir, open_store(store), key, plain) as stop:
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            console.print("enrollment service running (Ctrl-C stops it)")
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.wait(0.5):
                    pass
