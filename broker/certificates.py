"""Device certificates from the fleet CA, and their revocation list.

A device certificate's common name is its client id: Mosquitto's ``use_identity_as_username``
makes that the username, so the ACL's ``%u`` patterns confine a certificate to its own device's
topics exactly as they confine a password account. Certificates are ECDSA P-256, signed by the
CA that ``fedge broker init`` made, for client authentication only.

Revocation is a CRL (``crl.pem``) signed by the same CA. Mosquitto checks every client
certificate against it (``crlfile``), and with ``X509_V_FLAG_CRL_CHECK`` a listener without a CRL
for the issuing CA refuses every client certificate: ``init`` writes an empty one. A CRL expires
(``nextUpdate``) and an expired one also refuses everyone, so ours is valid as long as the CA.
Each new CRL's ``lastUpdate`` is later than the previous one's: a broker that loads a second CRL
from the same CA keeps the newest, and OpenSSL compares them to the second.

The issued certificates are kept (``issued/<serial>.pem``, public data): revoking a device
revokes every certificate ever issued to its id.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CRL_FILE = "crl.pem"
ISSUED_DIR = "issued"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret (a private key) readable by its owner only, from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class DeviceCertificate:
    """Where an issued certificate and its key were written (the key only once, 0600)."""

    client_id: str
    serial: int
    cert_file: Path
    key_file: Path
    not_after: datetime.datetime


@dataclass(frozen=True)
class FleetCA:
    """The CA of one provisioned broker folder (``ca.crt``, ``ca.key``), its issued certificates and its CRL."""

    folder: Path

    @property
    def crl_file(self) -> Path:
        return self.folder / CRL_FILE

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate((self.folder / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((self.folder / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{self.folder / 'ca.key'} is not the EC key fedge broker init writes")
        return cert, key

    def issue(self, client_id: str, dest: Path, *, days: int) -> DeviceCertificate:
        """A client certificate for ``client_id`` (its common name), written with its key into ``dest``."""
        ca, ca_key = self._load()
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + datetime.timedelta(days=days), ca.not_valid_after_utc)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                              decipher_only=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        issued = self.folder / ISSUED_DIR
        issued.mkdir(exist_ok=True)
        (issued / f"{cert.serial_number:x}.pem").write_bytes(pem)
        dest.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = dest / f"{client_id}.key", dest / f"{client_id}.crt"
        write_private(key_file, key_pem(key))
        cert_file.write_bytes(pem)
        return DeviceCertificate(client_id, cert.serial_number, cert_file, key_file, not_after)

    def issued_to(self, client_id: str) -> list[int]:
        """Serials of every certificate issued to ``client_id``, revoked or not."""
        serials = []
        for path in sorted((self.folder / ISSUED_DIR).glob("*.pem")):
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if names and names[0].value == client_id:
                serials.append(cert.serial_number)
        return serials

    def revoked(self) -> set[int]:
        if not self.crl_file.exists():
            return set()
        return {entry.serial_number for entry in x509.load_pem_x509_crl(self.crl_file.read_bytes())}

    def revoke(self, serials: set[int]) -> set[int]:
        """Add ``serials`` to the CRL and rewrite it (atomically); returns the serials newly revoked."""
        already = self.revoked()
        new = serials - already
        if new or not self.crl_file.exists():
            self.write_crl(already | serials)
        return new

    def write_crl(self, serials: set[int]) -> None:
        ca, ca_key = self._load()
        previous = x509.load_pem_x509_crl(self.crl_file.read_bytes()) if self.crl_file.exists() else None
        number = 1
        if previous is not None:
            # a strictly later lastUpdate, never one in the future (a CRL not yet valid refuses everyone)
            wait = (previous.last_update_utc - datetime.datetime.now(datetime.UTC)).total_seconds() + 1
            if wait > 0:
                time.sleep(wait)
            number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject).last_update(now).next_update(ca.not_valid_after_utc)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for serial in sorted(serials):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        partial = self.crl_file.with_suffix(".pem.partial")
        partial.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        partial.replace(self.crl_file)
