"""`fhai-coordinator init`: a broker folder with its own CA, a TLS server certificate, a Mosquitto
configuration with the dynamic-security plugin, and the three service accounts.

Layout of the folder (see docs/security.md):

    broker.json                 where things are and who the accounts are (no secrets)
    ca.pem                      the CA certificate: every device and the coordinator pin it
    server.pem                  the broker's certificate (SAN: the host, localhost, 127.0.0.1, ::1)
    mosquitto.conf
    secrets/          0700
      ca.key, server.key        0600
      admin.password            enrollment service and revocation: the dynsec control API
      coordinator.password      the round service: rounds and models out, updates in
      bootstrap.password        shared by devices that are not enrolled yet: enrollment topics only
      dynamic-security.json     the plugin's state (hashed passwords, roles); the broker rewrites it
    data/                       Mosquitto persistence
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator import dynsec
from coordinator.broker import MAX_PACKET_BYTES, broker_template
from coordinator.errors import CoordinatorError
from edge_runtime.mqtt import BrokerSettings

PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
ACCOUNTS = {
    # role in broker.json: (username, dynsec role, description)
    "admin": ("fhai-admin", dynsec.ADMIN_ROLE, "FH-AI enrollment service (dynsec admin)"),
    "coordinator": ("fhai-coordinator", dynsec.COORDINATOR_ROLE, "FH-AI round service"),
    "bootstrap": ("fhai-bootstrap", dynsec.BOOTSTRAP_ROLE, "FH-AI devices awaiting enrollment"),
}
CA_DAYS = 3650
SERVER_DAYS = 730


class SecurityError(CoordinatorError):
    """A broker folder that cannot be made or read."""


def write_secret(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (0600), whatever the umask; replaces an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)
    tmp.replace(path)


def find_dynsec_plugin() -> str:
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise SecurityError(
        "FHAI-Y001",
        "mosquitto_dynamic_security.so not found: install Mosquitto 2.0 (`apt-get install mosquitto`), "
        "find the plugin with `dpkg -L mosquitto` and pass it with --plugin",
    )


# certificates ------------------------------------------------------------------------------------
def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name: str = "FH-AI broker CA", days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed P-256 CA that may only sign end-entity certificates (path length 0).

    P-256 rather than Ed25519: every TLS stack a bedside device may carry (mbedTLS, wolfSSL, OpenSSL 1.1)
    verifies ECDSA P-256 chains; Ed25519 certificates are not universally supported in TLS.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], days: int = SERVER_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The broker's TLS certificate: serverAuth only, valid for every name in `hosts`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


# the broker folder -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerDir:
    """A broker folder made by `init`: paths, ports and the accounts' credentials."""

    root: Path
    host: str
    tls_port: int
    plain_port: int | None

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.pem"

    @property
    def config_file(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def dynsec_file(self) -> Path:
        return self.secrets / "dynamic-security.json"

    @property
    def log_file(self) -> Path:
        return self.root / "mosquitto.log"

    def username(self, account: str) -> str:
        return ACCOUNTS[account][0]

    def password_file(self, account: str) -> Path:
        return self.secrets / f"{account}.password"

    def settings(self, account: str, plain: bool = False) -> BrokerSettings:
        """How `account` connects: TLS to host:tls_port pinned to our CA, or the loopback plain listener."""
        if account not in ACCOUNTS:
            raise SecurityError("FHAI-Y002", f"unknown account {account!r}; expected one of {sorted(ACCOUNTS)}")
        password = self.password_file(account).read_text().strip()
        if plain:
            if self.plain_port is None:
                raise SecurityError(
                    "FHAI-Y003", f"{self.root} has no plain listener: run init with --plain-port, or use TLS"
                )
            return BrokerSettings("127.0.0.1", self.plain_port, self.username(account), password)
        return BrokerSettings(self.host, self.tls_port, self.username(account), password, ca_file=str(self.ca_file))

    @classmethod
    def load(cls, root: Path) -> BrokerDir:
        meta_file = root / "broker.json"
        try:
            meta = json.loads(meta_file.read_text())
        except OSError as exc:
            raise SecurityError(
                "FHAI-Y004", f"{meta_file} is missing: make the broker folder with `fhai-coordinator init --dir {root}`"
            ) from exc
        return cls(root.resolve(), meta["host"], int(meta["tls_port"]), meta.get("plain_port"))


def mosquitto_config(layout: BrokerDir, bind: str, plugin: str, user: str) -> str:
    plain = ""
    if layout.plain_port is not None:
        plain = (
            "\n# The coordinator's own processes on this host (no TLS, loopback only; credentials still required).\n"
            f"listener {layout.plain_port} 127.0.0.1\n"
        )
    return broker_template("mosquitto-secure").format(
        user=user,
        plugin=plugin,
        dynsec_file=layout.dynsec_file,
        tls_port=layout.tls_port,
        bind=bind,
        ca_file=layout.ca_file,
        cert_file=layout.root / "server.pem",
        key_file=layout.secrets / "server.key",
        plain_listener=plain,
        data_dir=layout.root / "data",
        max_packet_size=MAX_PACKET_BYTES,
        log_file=layout.log_file,
    )


def init_broker_dir(
    root: Path,
    host: str = "127.0.0.1",
    tls_port: int = 8883,
    plain_port: int | None = None,
    bind: str = "0.0.0.0",
    plugin: str | None = None,
    extra_hosts: tuple[str, ...] = (),
) -> BrokerDir:
    """Make everything a secure broker needs under `root` (which must not hold one already)."""
    root = root.resolve()
    if (root / "broker.json").exists():
        raise SecurityError(
            "FHAI-Y005",
            f"{root} already holds a broker (broker.json): pick another --dir, or delete it to start over "
            "(every enrolled device would have to enroll again)",
        )
    plugin = plugin or find_dynsec_plugin()
    root.mkdir(parents=True, exist_ok=True)
    layout = BrokerDir(root, host, tls_port, plain_port)
    layout.secrets.mkdir(mode=0o700, exist_ok=True)
    os.chmod(layout.secrets, 0o700)
    (root / "data").mkdir(mode=0o700, exist_ok=True)

    server_names = list(dict.fromkeys([host, *extra_hosts, "localhost", "127.0.0.1", "::1"]))
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, server_names)
    write_secret(layout.secrets / "ca.key", _key_pem(ca_key))
    write_secret(layout.secrets / "server.key", _key_pem(server_key))
    layout.ca_file.write_bytes(_cert_pem(ca_cert))
    (root / "server.pem").write_bytes(_cert_pem(server_cert))

    accounts: dict[str, tuple[str, str, str]] = {}
    for account, (username, role, text) in ACCOUNTS.items():
        password = dynsec.new_password()
        write_secret(layout.password_file(account), (password + "\n").encode())
        accounts[role] = (username, password, text)
    write_secret(layout.dynsec_file, json.dumps(dynsec.initial_config(accounts), indent=1).encode())

    layout.config_file.write_text(mosquitto_config(layout, bind, plugin, getpass.getuser()))
    meta: dict[str, Any] = {
        "version": 1,
        "host": host,
        "bind": bind,
        "tls_port": tls_port,
        "plain_port": plain_port,
        "ca_file": "ca.pem",
        "server_names": server_names,
        "accounts": {
            account: {"username": username, "password_file": f"secrets/{account}.password"}
            for account, (username, _role, _text) in ACCOUNTS.items()
        },
    }
    (root / "broker.json").write_text(json.dumps(meta, indent=2) + "\n")
    return layout


def renew_server_certificate(root: Path, days: int = SERVER_DAYS) -> x509.Certificate:
    """A new key and certificate for the broker, from the same CA and for the same names; devices need
    nothing new (they pin the CA). Restart the broker to use it. Needs secrets/ca.key back if it was moved."""
    layout = BrokerDir.load(root)
    ca_key_file = layout.secrets / "ca.key"
    try:
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    except OSError as exc:
        raise SecurityError(
            "FHAI-Y006", f"cannot read the CA key {ca_key_file} ({exc.strerror}): put it back to renew the certificate"
        ) from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SecurityError("FHAI-Y007", f"{ca_key_file} is not the EC key `init` made")
    ca_cert = x509.load_pem_x509_certificate(layout.ca_file.read_bytes())
    names = json.loads((layout.root / "broker.json").read_text()).get("server_names") or [layout.host]
    key, cert = make_server_cert(ca_key, ca_cert, names, days)
    write_secret(layout.secrets / "server.key", _key_pem(key))
    (layout.root / "server.pem").write_bytes(_cert_pem(cert))
    return cert
