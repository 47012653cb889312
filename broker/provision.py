"""Provision a production Mosquitto for one fleet: TLS material, accounts and the ACL.

``init`` writes into one folder:

    ca.crt, ca.key          a private certificate authority (devices trust only this CA)
    server.crt, server.key  the broker's certificate, for the names and addresses in ``hosts``
    passwd                  Mosquitto password file (salted hashes, via mosquitto_passwd)
    crl.pem                 the CA's certificate revocation list (broker/certificates.py)
    issued/                 every client certificate issued (public), to revoke them by device
    devices/<id>/           a certificate account's files to copy to the device (its key: 0600)
    acl                     per-device topic rights (broker/mosquitto/production.acl)
    mosquitto.conf          broker/mosquitto/production.conf rendered for this folder
    fleet.json              fleet name, public host and port: what add-device prints
    data/                   the broker's persistence

Devices are accounts whose username is their client id; the ACL's ``%u`` patterns then confine
each one to its own topics (its updates, presence and receipts, and in secure-aggregation rounds its
own protocol messages, key list and bundle). An account authenticates with a password (random, shown once, stored
only hashed) or a client certificate from the fleet's CA (its common name is the client id, which
Mosquitto's ``use_identity_as_username`` makes the username). ``auth`` chooses the listeners:

    password      one TLS listener, username and password (the default)
    certificate   one TLS listener that requires a client certificate; no password is asked
    both          the password listener on ``port`` and the certificate one on ``cert_port``

Both kinds share one ACL, so a certificate is confined exactly as a password is. Private keys are
written 0600. After ``add_account``/``add_certificate``/``remove_account`` a running broker must
reload its files: ``kill -HUP <mosquitto pid>`` re-reads the passwords, the ACL and the CRL.
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
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

from broker.certificates import FleetCA, key_pem, write_private
from broker.errors import ProvisionError
from fedge_contract.topics import check_name

AGGREGATOR_USER = "fedge-aggregator"
DEFAULT_PORT = 8883
CERT_DAYS = 3650
DEVICE_CERT_DAYS = 825  # a device certificate outlives a device's usual service, not the CA
AUTH_MODES = ("password", "certificate", "both")


@dataclass(frozen=True)
class Credentials:
    """What a device (or the aggregator) needs to connect: print it once, copy it to the device.

    A password account has ``password``; a certificate account has ``cert_file`` and ``key_file``.
    """

    username: str
    password: str | None
    url: str  # mqtts://host:port (without the secret)
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def instructions(self) -> str:
        command = "aggregator" if self.username == AGGREGATOR_USER else f"agent --client-id {self.username}"
        lines = [f"broker URL : {self.url}", f"CA file    : {self.ca_file}  (copy it to the device)"]
        if self.cert_file is not None and self.key_file is not None:
            lines += [
                f"certificate: {self.cert_file}",
                f"key        : {self.key_file}  (private: copy it to the device, then delete it here)",
                (f"run        : fedge {command} --broker {self.url} --ca-file {self.ca_file.name} "
                 f"--cert-file {self.cert_file.name} --key-file {self.key_file.name} ..."),
            ]
        else:
            lines += [
                f"username   : {self.username}",
                f"password   : {self.password}  (shown once; only its hash is stored)",
                (f"run        : fedge {command} --broker 'mqtts://{self.username}:{self.password}@{self.url.split('://', 1)[1]}' "
                 f"--ca-file {self.ca_file.name} ..."),
            ]
        return "\n".join(lines)


def find_mosquitto_passwd() -> str:
    found = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/local/bin:/opt/homebrew/bin")
    if not found:
        raise ProvisionError("mosquitto_passwd is not installed (it comes with the mosquitto package)")
    return found


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
    now = datetime.datetime.now(datetime.UTC)
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
    write_private(folder / "ca.key", key_pem(ca_key))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_private(folder / "server.key", key_pem(server_key))
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

    @property
    def auth(self) -> str:
        return str(self.settings.get("auth", "password"))  # folders from before certificates: passwords

    @property
    def ca(self) -> FleetCA:
        return FleetCA(self.path)

    def url(self) -> str:
        """The listener password accounts use (in ``certificate`` mode: the only, certificate listener)."""
        return f"mqtts://{self.settings['host']}:{self.settings['port']}"

    def certificate_url(self) -> str:
        if self.auth == "password":
            raise ProvisionError(f"{self.path} has no certificate listener (it was made with --auth password): "
                                 "provision a folder with --auth both or --auth certificate")
        return f"mqtts://{self.settings['host']}:{self.settings.get('cert_port') or self.settings['port']}"

    def _passwd(self, *args: str) -> None:
        result = subprocess.run([find_mosquitto_passwd(), *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ProvisionError(f"mosquitto_passwd failed: {(result.stderr or result.stdout).strip()}")

    def add_account(self, username: str) -> Credentials:
        """Create (or reset the password of) an account; the password is returned once."""
        check_name("client id", username)
        if self.auth == "certificate":
            raise ProvisionError(f"{self.path}'s broker accepts only client certificates: add the device with --cert")
        password = secrets.token_urlsafe(24)
        self._passwd("-b", str(self.path / "passwd"), username, password)
        return Credentials(username, password, self.url(), self.ca_file)

    def add_certificate(self, username: str, *, days: int = DEVICE_CERT_DAYS) -> Credentials:
        """Issue a client certificate for ``username`` into ``devices/<username>/``; earlier ones are revoked.

        As a new password replaces the old, a new certificate replaces the device's earlier ones:
        a lost or copied key stops working at the broker's next reload.
        """
        check_name("client id", username)
        url = self.certificate_url()
        ca = self.ca
        earlier = set(ca.issued_to(username))
        issued = ca.issue(username, self.path / "devices" / username, days=days)
        ca.revoke(earlier)
        shutil.copyfile(self.ca_file, issued.cert_file.parent / "ca.crt")
        return Credentials(username, None, url, issued.cert_file.parent / "ca.crt", issued.cert_file, issued.key_file)

    def remove_account(self, username: str) -> None:
        """Delete the device's password and revoke every certificate it was issued (CRL)."""
        check_name("client id", username)
        if username == AGGREGATOR_USER:
            raise ProvisionError("refusing to remove the aggregator's account")
        if username not in self.accounts():
            raise ProvisionError(f"no device {username!r} in {self.path / 'passwd'} or among its certificates")
        if username in self.password_accounts():
            self._passwd("-D", str(self.path / "passwd"), username)
        ca = self.ca
        ca.revoke(set(ca.issued_to(username)))
        shutil.rmtree(self.path / "devices" / username, ignore_errors=True)

    def password_accounts(self) -> list[str]:
        lines = (self.path / "passwd").read_text().splitlines()
        return [line.split(":", 1)[0] for line in lines if ":" in line]

    def certificate_accounts(self) -> list[str]:
        """Client ids holding a certificate that is not revoked."""
        issued = self.path / "issued"
        if not issued.is_dir():
            return []
        revoked = self.ca.revoked()
        valid = []
        for path in issued.glob("*.pem"):
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            if cert.serial_number not in revoked:
                valid.append((cert.not_valid_before_utc, str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)))
        return list(dict.fromkeys(name for _, name in sorted(valid)))  # in the order they were issued

    def accounts(self) -> list[str]:
        """Every account: password ones first (in file order), then certificate-only ones."""
        passwords = self.password_accounts()
        return passwords + [name for name in self.certificate_accounts() if name not in passwords]


def render_config(folder: Path, *, auth: str, port: int, cert_port: int | None, bind: str | None, max_packet_size: int,
                  user: str) -> str:
    """``production.conf`` with the listeners ``auth`` asks for (``listener-*.conf``)."""
    if auth not in AUTH_MODES:
        raise ProvisionError(f"auth must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
    templates = resources.files("broker").joinpath("mosquitto")
    where = {"dir": folder, "bind": f" {bind}" if bind else ""}
    listeners = []
    if auth in ("password", "both"):
        listeners.append(templates.joinpath("listener-password.conf").read_text().format(port=port, **where))
    if auth in ("certificate", "both"):
        listen = port if auth == "certificate" else cert_port
        listeners.append(templates.joinpath("listener-certificate.conf").read_text().format(port=listen, **where))
    return templates.joinpath("production.conf").read_text().format(
        dir=folder, listeners="\n".join(listeners).rstrip("\n"), max_packet_size=max_packet_size, user=user,
    )


def init(
    folder: Path,
    *,
    fleet: str = "default",
    host: str = "localhost",
    port: int = DEFAULT_PORT,
    bind: str | None = None,
    max_packet_size: int = 64 * 1024 * 1024,
    user: str | None = None,
    auth: str = "password",
    cert_port: int | None = None,
) -> tuple[BrokerFolder, Credentials]:
    """Create the folder's TLS material, config, ACL, an empty CRL and the aggregator's account.

    ``host`` is the name devices use to reach the broker (it goes into the certificate with
    localhost and 127.0.0.1); ``bind`` restricts the listener to one address (default: all).
    ``auth`` picks the listeners (module docstring); with ``both``, ``cert_port`` defaults to
    ``port + 1`` (8884 beside 8883). The aggregator gets a certificate when its listener needs one.
    """
    check_name("fleet", fleet)
    if auth == "both":
        cert_port = cert_port or port + 1
        if cert_port == port:
            raise ProvisionError(f"the certificate listener needs a port of its own, not {port}")
    else:
        cert_port = None
    folder = folder.resolve()
    if (folder / "fleet.json").exists():
        raise ProvisionError(f"{folder} is already provisioned: use add-device, or another folder")
    config = render_config(folder, auth=auth, port=port, cert_port=cert_port, bind=bind, max_packet_size=max_packet_size,
                           user=user or getpass.getuser())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    make_certificates(folder, [host, "localhost", "127.0.0.1"])
    FleetCA(folder).write_crl(set())  # a CRL must exist: with CRL checks on, a CA without one refuses everyone
    templates = resources.files("broker").joinpath("mosquitto")
    (folder / "acl").write_text(templates.joinpath("production.acl").read_text().format(fleet=fleet, aggregator=AGGREGATOR_USER))
    (folder / "mosquitto.conf").write_text(config)
    write_private(folder / "passwd", b"")
    settings = {"fleet": fleet, "host": host, "port": port, "auth": auth, "cert_port": cert_port}
    (folder / "fleet.json").write_text(json.dumps(settings, indent=2))
    broker = BrokerFolder(folder)
    if auth == "certificate":
        return broker, broker.add_certificate(AGGREGATOR_USER, days=CERT_DAYS)
    return broker, broker.add_account(AGGREGATOR_USER)
