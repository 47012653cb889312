"""Provisioning's authentication modes, certificates and CRL, without a broker (pure file checks)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.provision import AGGREGATOR_USER, BrokerFolder, ProvisionError, init


def listeners(folder: BrokerFolder) -> list[list[str]]:
    """Each listener block of the rendered config, as its option lines."""
    blocks: list[list[str]] = []
    for line in folder.config_file.read_text().splitlines():
        if line.startswith("listener "):
            blocks.append([line])
        elif blocks and line and not line.startswith("#") and line.split()[0] in (
                "cafile", "certfile", "keyfile", "tls_version", "require_certificate", "use_identity_as_username", "crlfile"):
            blocks[-1].append(line)
    return blocks


def test_password_mode_is_one_listener_without_client_certificates(tmp_path):
    folder, aggregator = init(tmp_path / "b", port=8883)
    [block] = listeners(folder)
    assert block[0] == "listener 8883" and "require_certificate false" in block and not any("crlfile" in o for o in block)
    assert aggregator.password and aggregator.cert_file is None and folder.auth == "password"
    with pytest.raises(ProvisionError, match="--auth both"):
        folder.add_certificate("dev-1")


def test_certificate_mode_requires_certificates_names_users_by_them_and_checks_the_crl(tmp_path):
    folder, aggregator = init(tmp_path / "b", port=8883, auth="certificate")
    [block] = listeners(folder)
    assert {"require_certificate true", "use_identity_as_username true", f"crlfile {folder.path}/crl.pem"} <= set(block)
    assert aggregator.cert_file is not None and aggregator.password is None and folder.accounts() == [AGGREGATOR_USER]
    assert x509.load_pem_x509_crl((folder.path / "crl.pem").read_bytes()).is_signature_valid(
        x509.load_pem_x509_certificate(folder.ca_file.read_bytes()).public_key())  # type: ignore[arg-type]
    with pytest.raises(ProvisionError, match="--cert"):
        folder.add_account("dev-1")  # a password nobody could use


def test_both_mode_puts_certificates_on_their_own_port(tmp_path):
    folder, aggregator = init(tmp_path / "b", port=8883, auth="both", host="hub")
    password, certificate = listeners(folder)
    assert password[0] == "listener 8883" and certificate[0] == "listener 8884" and "require_certificate true" in certificate
    assert aggregator.password and folder.certificate_url() == "mqtts://hub:8884" and folder.url() == "mqtts://hub:8883"
    with pytest.raises(ProvisionError):
        init(tmp_path / "c", port=8883, auth="both", cert_port=8883)
    with pytest.raises(ProvisionError):
        init(tmp_path / "d", auth="tokens")


def test_a_device_certificate_names_the_device_is_for_clients_and_its_key_is_private(tmp_path):
    folder, _ = init(tmp_path / "b", auth="both")
    issued = folder.add_certificate("pi-7")
    assert issued.cert_file is not None and issued.key_file is not None
    cert = x509.load_pem_x509_certificate(issued.cert_file.read_bytes())
    ca = x509.load_pem_x509_certificate(folder.ca_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-7"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    cert.verify_directly_issued_by(ca)
    assert issued.key_file.stat().st_mode & 0o077 == 0 and (issued.cert_file.parent / "ca.crt").read_bytes() == folder.ca_file.read_bytes()
    text = issued.instructions()
    assert "--cert-file pi-7.crt --key-file pi-7.key" in text and "mqtts://localhost:8884" in text and "password" not in text


def test_reissuing_and_removing_revoke_in_the_crl(tmp_path):
    folder, _ = init(tmp_path / "b", auth="certificate")
    ca = folder.ca
    first = ca.issued_to("pi-1")
    assert first == []
    folder.add_certificate("pi-1")
    current = folder.add_certificate("pi-1")  # replaces the first
    folder.add_certificate("pi-2")
    assert current.cert_file is not None
    new = x509.load_pem_x509_certificate(current.cert_file.read_bytes()).serial_number
    [old] = set(ca.issued_to("pi-1")) - {new}
    assert ca.revoked() == {old}
    assert folder.accounts() == [AGGREGATOR_USER, "pi-1", "pi-2"]
    folder.remove_account("pi-1")
    assert ca.revoked() == {old, new} and folder.accounts() == [AGGREGATOR_USER, "pi-2"]
    assert not (folder.path / "devices" / "pi-1").exists()
    crl = x509.load_pem_x509_crl(ca.crl_file.read_bytes())
    assert crl.next_update_utc is not None and crl.next_update_utc >= x509.load_pem_x509_certificate(folder.ca_file.read_bytes()).not_valid_after_utc
    with pytest.raises(ProvisionError):
        folder.remove_account("pi-1")  # already gone
    with pytest.raises(ProvisionError):
        folder.remove_account(AGGREGATOR_USER)


def test_each_crl_is_newer_than_the_last(tmp_path):
    """A broker holding two CRLs of one CA uses the newest (OpenSSL compares lastUpdate to the second)."""
    folder, _ = init(tmp_path / "b", auth="certificate")
    dates = []
    for device in ("a", "b"):
        folder.add_certificate(device)
        folder.remove_account(device)
        crl = x509.load_pem_x509_crl(folder.ca.crl_file.read_bytes())
        dates.append((crl.last_update_utc, crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number))
    assert dates[0][0] < dates[1][0] and dates[0][1] < dates[1][1]
