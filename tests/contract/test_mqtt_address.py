"""Broker URLs, client certificates and the aiomqtt version check (the parts of fedge_contract.mqtt
that need no broker; the reconnect schedule is tests/contract/test_reconnect.py)."""

from __future__ import annotations

import dataclasses
import re
import ssl
from pathlib import Path

import pytest

from fedge_contract._aiomqtt_compat import SUPPORTED, check_version
from fedge_contract.mqtt import BrokerAddress, make_client


@pytest.mark.parametrize(
    "url, host, port, tls",
    [
        ("mqtt://h:1", "h", 1, False),
        ("mqtt://broker.local", "broker.local", 1883, False),
        ("mqtts://broker.local", "broker.local", 8883, True),
        ("mqtts://broker.local:9999", "broker.local", 9999, True),
        ("tcp://10.0.0.1:1884", "10.0.0.1", 1884, False),
        ("ssl://h", "h", 8883, True),
        ("localhost:1884", "localhost", 1884, False),  # no scheme: mqtt://
        ("localhost", "localhost", 1883, False),
        ("mqtt://[::1]:1883", "::1", 1883, False),
    ],
)
def test_parse(url: str, host: str, port: int, tls: bool) -> None:
    address = BrokerAddress.parse(url)
    assert (address.host, address.port, address.tls) == (host, port, tls)
    assert address.username is None and address.password is None


def test_user_and_password_are_unquoted() -> None:
    address = BrokerAddress.parse("mqtts://dev%40site:p%3Ass%2Fw%40rd@h", ca_file="/etc/ca.pem")
    assert address.username == "dev@site"
    assert address.password == "p:ss/w@rd"
    assert address.ca_file == "/etc/ca.pem"
    assert (address.host, address.port, address.tls) == ("h", 8883, True)


def test_user_without_password() -> None:
    address = BrokerAddress.parse("mqtt://agent-1@h:1883")
    assert address.username == "agent-1" and address.password is None


def test_str_hides_the_password() -> None:
    address = BrokerAddress.parse("mqtts://u:secret@h:8884")
    assert str(address) == "mqtts://u@h:8884"
    assert "secret" not in str(address)
    assert str(BrokerAddress.parse("h")) == "mqtt://h:1883"


@pytest.mark.parametrize(
    "url", ["http://h:1883", "ws://h", "mqtt://", "mqtt://:1883", "mqtts://user@", "mqtt://h:notaport", "mqtt://h:70000"]
)
def test_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        BrokerAddress.parse(url)


def test_port_zero_is_refused() -> None:
    with pytest.raises(ValueError):
        BrokerAddress.parse("mqtt://h:0")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from broker.provision import make_certificates

    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder, ["127.0.0.1"])
    return folder


async def test_a_client_certificate_is_loaded_into_the_tls_context(certificates: Path) -> None:
    address = BrokerAddress.parse(
        "mqtts://h", ca_file=str(certificates / "ca.crt"),
        cert_file=str(certificates / "server.crt"), key_file=str(certificates / "server.key"),
    )
    assert (address.cert_file, address.key_file) == (str(certificates / "server.crt"), str(certificates / "server.key"))
    assert isinstance(address.tls_context(), ssl.SSLContext)
    mismatched = dataclasses.replace(address, key_file=str(certificates / "ca.key"))  # not this certificate's key
    with pytest.raises(ssl.SSLError):
        mismatched.tls_context()
    # aiomqtt builds its client on a running loop (nothing here awaits: pytest's timeout covers it)
    assert make_client(address, "device", persistent=False).identifier == "device"


def test_without_a_certificate_the_context_only_trusts_the_ca(certificates: Path) -> None:
    address = BrokerAddress.parse("mqtts://h", ca_file=str(certificates / "ca.crt"))
    assert address.cert_file is None and address.key_file is None
    assert isinstance(address.tls_context(), ssl.SSLContext)
    assert BrokerAddress.parse("mqtt://h").tls_context() is None


@pytest.mark.parametrize("files", [{"cert_file": "c.pem"}, {"key_file": "k.pem"}])
def test_a_certificate_without_its_key_or_a_key_without_its_certificate_is_refused(files: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        BrokerAddress.parse("mqtts://h", **files)


def test_a_client_certificate_without_tls_is_refused() -> None:
    with pytest.raises(ValueError, match="needs TLS"):
        BrokerAddress.parse("mqtt://h", cert_file="c.pem", key_file="k.pem")
    with pytest.raises(ValueError, match="needs TLS"):
        BrokerAddress("h", 1883, cert_file="c.pem", key_file="k.pem")


@pytest.mark.parametrize("version", ["2.3.0", "2.5.1", "2.99"])
def test_supported_aiomqtt_versions_pass_the_check(version: str) -> None:
    check_version(version)


@pytest.mark.parametrize("version", ["2.2.0", "3.0.0", "1.2", "dev"])
def test_an_unsupported_aiomqtt_is_refused_naming_the_supported_range(version: str) -> None:
    with pytest.raises(ImportError, match=re.escape(f"aiomqtt {SUPPORTED}, found {version}")):
        check_version(version)
