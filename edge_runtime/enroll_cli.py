"""`fhai-edge enroll`: trade a one-time token for this device's own broker account (edge_runtime/enroll.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_runtime.console import console, friendly_errors, parse_broker, setup_logging


def _secret(value: str | None, path: Path | None, what: str) -> str:
    if path is not None:
        return path.read_text().strip()
    if value:
        return value.strip()
    raise typer.BadParameter(f"give the {what} (or a file holding it)")


def register_enroll_command(app: typer.Typer) -> None:
    @app.command()
    @friendly_errors
    def enroll(
        broker: Annotated[str, typer.Option(help="The broker's TLS listener HOST:PORT")],
        ca: Annotated[Path, typer.Option(help="The broker's CA certificate (ca.pem from `fhai-coordinator init`)")],
        token: Annotated[str | None, typer.Option(help="One-time enrollment token (prefer --token-file)")] = None,
        token_file: Annotated[Path | None, typer.Option(help="File holding the enrollment token")] = None,
        bootstrap_user: Annotated[str, typer.Option(help="The shared bootstrap account")] = "fhai-bootstrap",
        bootstrap_password_file: Annotated[Path | None, typer.Option(help="File with the bootstrap password")] = None,
        state_dir: Annotated[Path, typer.Option("--state-dir", help="This device's state folder")] = Path("state/edge"),
        device_id: Annotated[
            str | None, typer.Option(help="Ask for this device id (default: the coordinator picks one)")
        ] = None,
        site: Annotated[str | None, typer.Option(help="Refuse unless the token is for this site")] = None,
        profile: Annotated[
            str, typer.Option(help="Device profile name or YAML path (sent to the coordinator)")
        ] = "gateway",
        coordinator_key: Annotated[
            str | None, typer.Option(help="Coordinator's public key (hex or file): verify the answer with it")
        ] = None,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for the enrollment service")] = 30.0,
        verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
    ) -> None:
        """Enroll this device: its credentials go to STATE_DIR/credentials.json (0600); `fhai-edge run` uses them."""
        from edge_runtime.enroll import enroll as do_enroll
        from edge_runtime.mqtt import BrokerSettings
        from edge_runtime.profile import load_profile

        setup_logging(state_dir / "edge.log", verbose)
        host, port = parse_broker(broker)
        bootstrap = BrokerSettings(
            host,
            port,
            username=bootstrap_user,
            password=_secret(None, bootstrap_password_file, "bootstrap password (--bootstrap-password-file)"),
            ca_file=str(ca),
        )
        key_text = None
        if coordinator_key is not None:
            key_path = Path(coordinator_key)
            key_text = key_path.read_text().strip() if key_path.is_file() else coordinator_key
        result = do_enroll(
            _secret(token, token_file, "enrollment token (--token-file)"),
            bootstrap,
            state_dir,
            device_id=device_id,
            site=site,
            profile=load_profile(profile).model_dump(mode="json"),
            coordinator_key=key_text,
            timeout_s=timeout,
        )
        console.print(f"[green]enrolled[/] as [bold]{result.device_id}[/] (site {result.site})")
        if coordinator_key is None:
            console.print(f"coordinator key (check it with the operator): {result.coordinator_key}")
        print(result.device_id)
