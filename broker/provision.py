"""Provision a production Mosquitto for one fleet: TLS material, accounts and the ACL.

``init`` writes into one folder:

    ca.crt, ca.key          a private certificate authority (devices trust only this CA)
    server.crt, server.key  the broker's certificate, for the names and addresses in ``hosts``
    passwd                  Mosquitto password file (salted hashes, via mosquitto_passwd)
    acl                     per-device topic rights (broker/mosquitto/production.acl)
    mosquitto.conf          broker/mosquitto/production.conf rendered for this folder
    fleet.json              fleet name, public host and port: what add-device prints
    data/                   the broker's persistence

Devices are accounts whose username is their client id; the ACL's ``%u`` patterns then confine
each one to its own topics. Passwords are random, shown once and stored only hashed. Private
keys are written 0600. After ``add_device``/``remove_device`` a running broker must reload its
files: ``kill -HUP <mosquitto pid>`` (or ``systemctl reload mosquitto``), no restart needed.
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge_contract.topics import check_name

AGGREGATOR_USER = "fedge-aggregator"
DEFAULT_PORT = 8883
CERT_DAYS = 3650


class ProvisionError(RuntimeError):
    """The folder or the tools are not what provisioning needs; the message says what to do."""


@dataclass(frozen=True)
class Credentials:
    """What a device (or the aggregator) needs to connect: print it once, copy it to the device."""

    username: str
    password: str
    url: str  # mqtts://host:port (without the secret)
    ca_file: Path

    def instructions(self) -> str:
        return "\n".join(
            [
                f"broker URL : {self.url}",
                f"CA file    : {self.ca_file}  (copy it to the device)",
                f"username   : {self.username}",
                f"password   : {self.password}  (shown once; only its hash is stored)",
                f"run        : fedge {'aggregator' if self.username == AGGREGATOR_USER else 'agent --client-id ' + self.username} "
                f"--broker 'mqtts://{self.username}:{self.password}@{self.url.split('://', 1)[1]}' --ca-file {self.ca_file.name} ...",
            ]
        )


def find_mosquitto_passwd() -> str:
    found = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/local/bin:/opt/homebrew/bin")
    if not found:
        raise ProvisionError("mosquitto_passwd is not installed (it comes with the mosquitto package)")
    return found


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(folder: Path, hosts: list[str], *, days: int = CERT_DAYS) -> None:
    """A CA and a server certificate signed by it, valid for ``hosts`` (names or IP addresses)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge fleet CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(folder / "ca.key", _key_pem(ca_key))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "server.key", _key_pem(server_key))
    (folder / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class BrokerFolder:
    """A provisioned folder (see the module docstring)."""

    path: Path

    @property
    def settings(self) -> dict[str, object]:
        try:
            return json.loads((self.path / "fleet.json").read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise ProvisionError(f"{self.path} is not a provisioned broker folder: run 'fedge broker init --tls {self.path}' first") from None

    @property
    def config_file(self) -> Path:
        return self.path / "mosquitto.conf"

    @property
    def ca_file(self) -> Path:
        return self.path / "ca.crt"

    @property
    def port(self) -> int:
        return int(self.settings["port"])  # type: ignore[call-overload]

    def url(self) -> str:
        return f"mqtts://{self.settings['host']}:{self.settings['port']}"

    def _passwd(self, *args: str) -> None:
        result = subprocess.run([find_mosquitto_passwd(), *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ProvisionError(f"mosquitto_passwd failed: {(result.stderr or result.stdout).strip()}")

    def add_account(self, username: str) -> Credentials:
        """Create (or reset the password of) an account; the password is returned once."""
        check_name("client id", username)
        password = secrets.token_urlsafe(24)
        self._passwd("-b", str(self.path / "passwd"), username, password)
        return Credentials(username, password, self.url(), self.ca_file)

    def remove_account(self, username: str) -> None:
        check_name("client id", username)
        if username == AGGREGATOR_USER:
            raise ProvisionError("refusing to remove the aggregator's account")
        if username not in self.accounts():
            raise ProvisionError(f"no device {username!r} in {self.path / 'passwd'}")
        self._passwd("-D", str(self.path / "passwd"), username)

    def accounts(self) -> list[str]:
        lines = (self.path / "passwd").read_text().splitlines()
        return [line.split(":", 1)[0] for line in lines if ":" in line]


def init(
    folder: Path,
    *,
    fleet: str = "default",
    host: str = "localhost",
    port: int = DEFAULT_PORT,
    bind: str | None = None,
    max_packet_size: int = 64 * 1024 * 1024,
    user: str | None = None,
) -> tuple[BrokerFolder, Credentials]:
    """Create the folder's TLS material, config, ACL and the aggregator's account.

    ``host`` is the name devices use to reach the broker (it goes into the certificate with
    localhost and 127.0.0.1); ``bind`` restricts the listener to one address (default: all).
    """
    check_name("fleet", fleet)
    folder = folder.resolve()
    if (folder / "fleet.json").exists():
        raise ProvisionError(f"{folder} is already provisioned: use add-device, or another folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    make_certificates(folder, [host, "localhost", "127.0.0.1"])
    templates = resources.files("broker").joinpath("mosquitto")
    (folder / "acl").write_text(templates.joinpath("production.acl").read_text().format(fleet=fleet, aggregator=AGGREGATOR_USER))
    config = templates.joinpath("production.conf").read_text().format(
        dir=folder, port=port, bind=f" {bind}" if bind else "", max_packet_size=max_packet_size, user=user or getpass.getuser(),
    )
    (folder / "mosquitto.conf").write_text(config)
    _write_private(folder / "passwd", b"")
    (folder / "fleet.json").write_text(json.dumps({"fleet": fleet, "host": host, "port": port}, indent=2))
    broker = BrokerFolder(folder)
    return broker, broker.add_account(AGGREGATOR_USER)
