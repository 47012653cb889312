"""deploy/cluster: the 3-node EMQX cluster, HAProxy and the aggregator agree with each other and with fedge.

Docker and EMQX cannot run here, so these tests read the files: the compose YAML, EMQX's HOCON
(pyhocon) and HAProxy's config (checked by a real `haproxy -c` when HAProxy is installed). They
check what a mistake would silently break: nodes that would not form one cluster, a path mounted
in one place and read from another, a broker limit below fedge's chunk size, the mqueue and
retained-message traps, the shared-subscription strategy, and the aggregator's command line
(parsed by fedge's own CLI).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml
from pyhocon import ConfigFactory, ConfigTree

from broker.provision import AGGREGATOR_USER
from fedge.cli import aggregator_config, build_parser
from fedge_contract.chunks import DEFAULT_MAX_MESSAGE_BYTES
from fedge_contract.mqtt import BrokerAddress

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "cluster"
NODES = ("emqx1", "emqx2", "emqx3")
MQTT_MAX_PACKET = 268_435_455  # MQTT's own ceiling (a 4-byte variable length)
PACKET_OVERHEAD = 64 * 1024  # a chunk's topic, properties and fixed header, generously
SUPPORTED_MODEL_BYTES = 1024**3  # README: a 1 GiB global model (f32: ~268M parameters) fits a device's queue
# EMQX 5.8's mqtt.shared_subscription_strategy values (apps/emqx/src/emqx_shared_sub.erl)
SHARED_STRATEGIES = {"random", "round_robin", "round_robin_per_group", "sticky", "local", "hash_topic", "hash_clientid"}
EMQX_BYTES = re.compile(r"^(\d+)(kb|KB|mb|MB|gb|GB)?$")  # hocon_postprocess:bytesize: binary units


def compose() -> dict:
    return yaml.safe_load((CLUSTER / "docker-compose.yml").read_text())


def compose_single() -> dict:
    return yaml.safe_load((CLUSTER.parent / "compose" / "docker-compose.yml").read_text())


def hocon() -> ConfigTree:
    return ConfigFactory.parse_file(str(CLUSTER / "emqx" / "emqx.conf"))


def nbytes(value: object) -> int:
    """An EMQX bytesize ("64MB" = 64 MiB) in bytes."""
    if isinstance(value, int):
        return value
    match = EMQX_BYTES.match(str(value))
    assert match, f"{value!r} is not an EMQX byte size"
    unit = (match.group(2) or "").upper()
    return int(match.group(1)) * {"": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[unit]


def queue_len(value: object) -> int:
    """A bounded max_mqueue_len: 0 and infinity mean unbounded, which these tests refuse."""
    assert isinstance(value, int) and value > 0, f"max_mqueue_len {value!r} must be a bounded number"
    return value


def mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to deploy/cluster) or volume name."""
    result = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        result[target] = source
    return result


def port_of(bind: str) -> int:
    return int(str(bind).rsplit(":", 1)[-1])


def haproxy_backends() -> dict[str, set[tuple[str, int]]]:
    backends: dict[str, set[tuple[str, int]]] = {}
    current = None
    for line in (CLUSTER / "haproxy" / "haproxy.cfg").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] in ("backend", "frontend", "defaults", "global", "resolvers"):
            current = words[1] if words[0] == "backend" else None
            if current:
                backends[current] = set()
        elif words[0] == "server" and current:
            host, port = words[2].rsplit(":", 1)
            backends[current].add((host, int(port)))
    return backends


def haproxy_binds() -> dict[str, int]:
    binds, current = {}, None
    for line in (CLUSTER / "haproxy" / "haproxy.cfg").read_text().splitlines():
        words = line.split()
        if words[:1] == ["frontend"]:
            current = words[1]
        elif words[:1] == ["bind"] and current:
            binds[current] = port_of(words[1])
    return binds


# ---- compose -----------------------------------------------------------------------------------

def test_three_emqx_nodes_form_one_cluster():
    services, conf = compose()["services"], hocon()
    assert set(NODES) <= set(services) and len([s for s in services if s.startswith("emqx")]) == 3
    names, cookies, images = set(), set(), set()
    for name in NODES:
        node = services[name]
        env = node["environment"]
        host = node["hostname"]
        assert env["EMQX_NODE__NAME"] == f"emqx@{host}", "the node name's host must be the container's FQDN"
        assert host.count(".") >= 1, "EMQX runs with long names: the host part must be an FQDN"
        assert host in node["networks"]["fedge"]["aliases"], "other nodes must resolve the node's host name"
        assert not any(key.startswith("EMQX_CLUSTER__") for key in env), "cluster settings live in the shared emqx.conf"
        names.add(env["EMQX_NODE__NAME"])
        cookies.add(env["EMQX_NODE__COOKIE"])
        images.add(node["image"])
        assert node["restart"] == "unless-stopped"
    assert len(names) == 3
    assert len(cookies) == 1 and next(iter(cookies)).startswith("${EMQX_NODE_COOKIE"), "one cookie, from .env, never in the file"
    assert "cookie" not in conf.get("node", ConfigTree()), "a cookie in emqx.conf would be committed"
    assert conf["cluster.discovery_strategy"] == "static"
    assert set(conf["cluster.static.seeds"]) == names, "static seeds must be exactly the nodes' names"
    assert isinstance(conf["cluster.name"], str) and conf["cluster.name"]
    (image,) = images
    match = re.fullmatch(r"emqx:5\.8\.(\d+)", image)
    assert match, f"{image}: pin an EMQX 5.8.x image (5.9+ needs a licence key to cluster)"


def test_nodes_have_health_checks_and_their_own_volumes():
    doc = compose()
    data_volumes = set()
    for name in NODES:
        node = doc["services"][name]
        assert node["healthcheck"]["test"] == ["CMD", "/opt/emqx/bin/emqx", "ctl", "status"]
        volumes = mounts(node)
        assert volumes["/opt/emqx/etc/emqx.conf"] == "./emqx/emqx.conf"
        data, log = volumes["/opt/emqx/data"], volumes["/opt/emqx/log"]
        assert data in doc["volumes"] and log in doc["volumes"], "named volumes must be declared"
        data_volumes.add(data)
        assert node["ulimits"]["nofile"]["soft"] >= 100_000, "one file descriptor per device connection"
    assert len(data_volumes) == 3, "each node needs its own data volume (its mnesia directory is named after it)"


def test_referenced_files_exist():
    services = compose()["services"]
    for name in NODES:
        for source in mounts(services[name]).values():
            if source.startswith("./") and source != "./secrets":  # secrets/ is written by cluster.py init
                assert (CLUSTER / source).is_file(), f"{name}: {source} is missing"
    assert (CLUSTER / mounts(services["haproxy"])["/usr/local/etc/haproxy/haproxy.cfg"]).is_file()
    build = services["aggregator"]["build"]  # the single-broker deployment's image, unchanged
    assert (CLUSTER / build["context"] / build["dockerfile"]).resolve() == (CLUSTER.parent / "compose" / "Dockerfile").resolve()
    assert services["aggregator"]["image"] == compose_single()["services"]["aggregator"]["image"]


def test_only_the_load_balancer_faces_devices():
    services = compose()["services"]
    for name in NODES:
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}: devices must go through HAProxy"
    published = {str(port).split(":")[-1] for port in services["haproxy"]["ports"] if not str(port).startswith("127.0.0.1:")}
    assert published == {"8883"}, "only MQTT over TLS is published; 1883 stays on the private network"


def test_aggregator_command_is_valid_for_fedge_and_reaches_the_internal_listener():
    services, conf = compose()["services"], hocon()
    agg = services["aggregator"]
    for name in NODES:
        assert agg["depends_on"][name]["condition"] == "service_healthy"
    assert "haproxy" in agg["depends_on"]
    assert mounts(agg)["/var/lib/fedge"] in compose()["volumes"]
    command = [re.sub(r"\$\{[^}]*\}", "PASSWORD", word) for word in agg["command"]]
    args = build_parser().parse_args(["aggregator", *command])  # fedge's own CLI: a typo'd flag fails here
    broker = BrokerAddress.parse(args.broker)
    assert broker.username == AGGREGATOR_USER and broker.password == "PASSWORD" and not broker.tls
    assert "${FEDGE_AGGREGATOR_PASSWORD" in agg["command"][1]
    assert broker.host in services["haproxy"]["networks"]["fedge"]["aliases"]
    assert broker.port == haproxy_binds()["mqtt_aggregator"]
    assert args.fleet == "default"  # the fleet acl.conf is written for
    assert aggregator_config(args).ingest.workers >= 2, "the cluster exists for sharded ingestion"
    # the aggregator's port leads to EMQX listeners in the aggregator's zone
    internal = {port for _, port in haproxy_backends()["emqx_tcp"]}
    (tcp_name,) = [n for n, listener in conf["listeners.tcp"].items() if port_of(listener["bind"]) in internal]
    assert conf[f"listeners.tcp.{tcp_name}.zone"] == "fedge_aggregator"


# ---- EMQX HOCON: the fedge-relevant keys -------------------------------------------------------

def test_packet_and_retained_limits_fit_fedge_chunks():
    conf = hocon()
    packet = nbytes(conf["mqtt.max_packet_size"])
    assert DEFAULT_MAX_MESSAGE_BYTES + PACKET_OVERHEAD <= packet <= MQTT_MAX_PACKET
    # a retained message above max_payload_size is delivered but not stored: late agents never see it
    assert conf["retainer.enable"] is True and conf["mqtt.retain_available"] is True
    assert nbytes(conf["retainer.max_payload_size"]) >= packet
    assert conf["retainer.backend.max_retained_messages"] == 0, "a limit refuses new retained topics silently"
    assert not conf["retainer.msg_expiry_interval"], "the current global model must never expire"


def test_queues_are_sized_for_devices_and_for_the_aggregator():
    conf = hocon()
    chunks = -(-SUPPORTED_MODEL_BYTES // DEFAULT_MAX_MESSAGE_BYTES) + 1  # the chunks plus the manifest
    device_window = conf["mqtt.max_inflight"] + queue_len(conf["mqtt.max_mqueue_len"])
    assert device_window >= 2 * chunks, "a device's session must hold two chunked versions of the model"
    zone = conf["zones.fedge_aggregator"]
    aggregator_queue = queue_len(zone["mqtt.max_mqueue_len"])
    assert aggregator_queue >= 10_000 and aggregator_queue >= 10 * conf["mqtt.max_mqueue_len"]
    assert zone["force_shutdown.max_mailbox_size"] >= aggregator_queue, "a round's burst must not kill the session"
    assert nbytes(zone["force_shutdown.max_heap_size"]) >= 256 * 1024**2


def test_shared_subscription_strategy_is_the_documented_one():
    conf = hocon()
    assert conf["mqtt.shared_subscription"] is True
    strategy = conf["mqtt.shared_subscription_strategy"]
    assert strategy in SHARED_STRATEGIES, f"{strategy!r} is not an EMQX strategy"
    assert strategy == "round_robin_per_group"  # README.md says why (round_robin is in effect random for fedge)
    assert f"`{strategy}`" in (CLUSTER / "README.md").read_text()


def test_authentication_and_authorization_use_the_mounted_files():
    conf, node = hocon(), compose()["services"]["emqx1"]
    volumes = mounts(node)
    secrets_dir = PurePosixPath(next(target for target, source in volumes.items() if source == "./secrets"))
    (authn,) = conf["authentication"]
    assert (authn["mechanism"], authn["backend"], authn["user_id_type"]) == ("password_based", "built_in_database", "username")
    assert authn["bootstrap_type"] == "plain"
    assert PurePosixPath(authn["bootstrap_file"]) == secrets_dir / "users.csv"  # written by cluster.py init
    assert PurePosixPath(conf["api_key.bootstrap_file"]) == secrets_dir / "api_keys"
    assert conf["authorization.no_match"] == "deny"
    (source,) = conf["authorization.sources"]
    assert source["type"] == "file" and source.get("enable", True)
    assert volumes[source["path"]] == "./emqx/acl.conf"
    tls = conf["listeners.ssl.default"]
    for key, name in [("cacertfile", "ca.crt"), ("certfile", "server.crt"), ("keyfile", "server.key")]:
        assert PurePosixPath(tls["ssl_options"][key]) == secrets_dir / name
    assert port_of(tls["bind"]) == 8883
    assert {port for _, port in haproxy_backends()["emqx_tls"]} == {8883}


# Keys checked against EMQX 5.8's schema (apps/emqx/src/emqx_schema.erl, emqx_retainer_schema.erl,
# emqx_authn_mnesia_schema.erl). EMQX refuses to start on an unknown key: a typo here stops every node.
KNOWN_KEYS = {
    "": {"node", "cluster", "listeners", "mqtt", "zones", "retainer", "authentication", "authorization",
         "api_key", "dashboard", "log", "force_shutdown", "force_gc", "flapping_detect", "overload_protection", "sysmon"},
    "node": {"name", "cookie", "data_dir", "max_ports", "dist_buffer_size", "process_limit"},
    "cluster": {"name", "discovery_strategy", "static", "dns", "autoheal", "autoclean", "core_nodes"},
    "cluster.static": {"seeds"},
    "mqtt": {"idle_timeout", "max_packet_size", "max_clientid_len", "max_topic_levels", "max_topic_alias", "max_qos_allowed",
             "retain_available", "wildcard_subscription", "shared_subscription", "shared_subscription_strategy",
             "shared_subscription_initial_sticky_pick", "exclusive_subscription", "ignore_loop_deliver", "strict_mode",
             "server_keepalive", "keepalive_multiplier", "retry_interval", "max_awaiting_rel", "await_rel_timeout",
             "session_expiry_interval", "message_expiry_interval", "max_mqueue_len", "mqueue_priorities",
             "mqueue_default_priority", "mqueue_store_qos0", "max_inflight", "max_subscriptions", "upgrade_qos",
             "use_username_as_clientid"},
    "force_shutdown": {"enable", "max_mailbox_size", "max_heap_size"},
    "retainer": {"enable", "msg_expiry_interval", "msg_clear_interval", "max_payload_size", "stop_publish_clear_msg",
                 "deliver_rate", "backend", "flow_control"},
    "retainer.backend": {"type", "storage_type", "max_retained_messages", "index_specs"},
    "listener": {"enable", "bind", "acceptors", "max_connections", "mountpoint", "zone", "enable_authn",
                 "proxy_protocol", "proxy_protocol_timeout", "tcp_options", "ssl_options", "access_rules"},
    "ssl_options": {"cacertfile", "certfile", "keyfile", "verify", "fail_if_no_peer_cert", "versions", "ciphers", "depth",
                    "reuse_sessions", "handshake_timeout", "honor_cipher_order"},
    "authentication": {"mechanism", "backend", "user_id_type", "password_hash_algorithm", "bootstrap_file", "bootstrap_type", "enable"},
    "password_hash_algorithm": {"name", "salt_position", "mac_fun", "iterations", "dk_length", "salt_rounds"},
    "authorization": {"no_match", "deny_action", "cache", "sources"},
    "authorization.cache": {"enable", "max_size", "ttl", "excludes"},
    "source": {"type", "enable", "path"},
    "api_key": {"bootstrap_file"},
}


def test_every_key_is_one_emqx_5_8_knows():
    conf = hocon()

    def check(section: str, tree: ConfigTree) -> None:
        unknown = set(tree) - KNOWN_KEYS[section]
        assert not unknown, f"emqx.conf: unknown keys in {section or 'the root'}: {sorted(unknown)}"

    check("", conf)
    for section in ["node", "cluster", "cluster.static", "mqtt", "retainer", "retainer.backend", "authorization", "authorization.cache", "api_key"]:
        check(section, conf[section])
    for zone in conf["zones"].values():
        assert set(zone) <= {"mqtt", "force_shutdown", "force_gc", "flapping_detect", "stats"}
        check("mqtt", zone.get("mqtt", ConfigTree()))
        check("force_shutdown", zone.get("force_shutdown", ConfigTree()))
    for kind in conf["listeners"].values():
        for listener in kind.values():
            check("listener", listener)
            check("ssl_options", listener.get("ssl_options", ConfigTree()))
    for authn in conf["authentication"]:
        check("authentication", authn)
        check("password_hash_algorithm", authn["password_hash_algorithm"])
    for source in conf["authorization.sources"]:
        check("source", source)


def test_haproxy_balances_over_exactly_the_cluster_nodes():
    hosts = {compose()["services"][name]["hostname"] for name in NODES}
    backends = haproxy_backends()
    assert set(backends) == {"emqx_tls", "emqx_tcp"}
    for servers in backends.values():
        assert {host for host, _ in servers} == hosts
    assert haproxy_binds()["mqtt_devices"] == 8883


HAPROXY = shutil.which("haproxy")


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_haproxy_config_is_valid():
    result = subprocess.run([HAPROXY, "-c", "-f", str(CLUSTER / "haproxy" / "haproxy.cfg")],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # the node names do not resolve outside Docker (init-addr ... none): that warning is expected, no other
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "[WARNING]" in line or "[ALERT]" in line]
    assert all("could not resolve address" in line for line in warnings), warnings
