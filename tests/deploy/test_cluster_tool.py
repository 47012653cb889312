"""deploy/cluster/cluster.py: the secrets docker compose needs, and device accounts over EMQX's REST API.

EMQX cannot run here: the API side is checked against a small stand-in that implements the
documented EMQX 5 endpoints (``/api/v5/authentication/password_based%3Abuilt_in_database/users``,
``/api/v5/clients/{clientid}``) with basic auth, and refuses anything else.
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import re
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from cryptography import x509

from broker.provision import AGGREGATOR_USER

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "cluster"
USERS = "/api/v5/authentication/password_based%3Abuilt_in_database/users"
CLIENTS = "/api/v5/clients/"


def load_tool():
    spec = importlib.util.spec_from_file_location("fedge_cluster_tool", CLUSTER / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


class FakeEmqx:
    """EMQX 5's user and client endpoints, in memory, behind basic auth."""

    def __init__(self, key: str, secret: str) -> None:
        self.auth = "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()
        self.users: dict[str, dict] = {}
        self.connected: set[str] = set()
        self.requests: list[tuple[str, str, dict | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, status: int, body: object = None) -> None:
                raw = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((self.command, self.path, body))
                if self.headers.get("Authorization") != fake.auth:
                    return self._answer(401, {"code": "BAD_API_KEY_OR_SECRET"})
                status, answer = fake.route(self.command, self.path, body)
                self._answer(status, answer)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def route(self, method: str, raw_path: str, body: dict | None) -> tuple[int, object]:
        parts = urlsplit(raw_path)
        path = parts.path
        if path == USERS and method == "POST":
            assert set(body) <= {"user_id", "password", "is_superuser"}
            if body["user_id"] in self.users:
                return 409, {"code": "ALREADY_EXISTS"}
            self.users[body["user_id"]] = {"password": body["password"], "is_superuser": body.get("is_superuser", False)}
            return 201, {"user_id": body["user_id"], "is_superuser": False}
        if path == USERS and method == "GET":
            query = parse_qs(parts.query)
            page, limit = int(query["page"][0]), int(query["limit"][0])
            names = sorted(self.users)
            data = [{"user_id": n, "is_superuser": False} for n in names[(page - 1) * limit : page * limit]]
            return 200, {"data": data, "meta": {"page": page, "limit": limit, "count": len(names), "hasnext": page * limit < len(names)}}
        if path.startswith(USERS + "/"):
            user = unquote(path[len(USERS) + 1 :])
            if user not in self.users:
                return 404, {"code": "NOT_FOUND"}
            if method == "PUT":
                self.users[user] = {"password": body["password"], "is_superuser": body.get("is_superuser", False)}
                return 200, {"user_id": user, "is_superuser": False}
            if method == "DELETE":
                del self.users[user]
                return 204, None
        if path.startswith(CLIENTS) and method == "DELETE":
            client = unquote(path[len(CLIENTS) :])
            if client not in self.connected:
                return 404, {"code": "CLIENTID_NOT_FOUND"}
            self.connected.discard(client)
            return 204, None
        return 404, {"code": "NOT_FOUND", "message": f"{method} {raw_path}"}


@pytest.fixture
def cluster_dir(tmp_path) -> Path:
    tool.init(tmp_path, "mqtt.example.com")
    return tmp_path


@pytest.fixture
def emqx(cluster_dir) -> Iterator[FakeEmqx]:
    env = tool.read_env(cluster_dir / ".env")
    fake = FakeEmqx(env["EMQX_API_KEY"], env["EMQX_API_SECRET"])
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
        fake.thread.join(timeout=10)


def test_init_writes_every_secret_compose_and_emqx_read(cluster_dir):
    env = tool.read_env(cluster_dir / ".env")
    compose_vars = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (CLUSTER / "docker-compose.yml").read_text()))
    assert compose_vars and compose_vars <= set(env), f"compose needs {sorted(compose_vars - set(env))} in .env"
    secrets = cluster_dir / "secrets"
    with (secrets / "users.csv").open() as f:
        rows = list(csv.DictReader(f))
    # EMQX's plain bootstrap format; never a superuser (a superuser skips the ACL)
    assert rows == [{"user_id": AGGREGATOR_USER, "password": env["FEDGE_AGGREGATOR_PASSWORD"], "is_superuser": "false"}]
    assert (secrets / "api_keys").read_text() == f"{env['EMQX_API_KEY']}:{env['EMQX_API_SECRET']}\n"
    for private in ["ca.key", "server.key", "users.csv", "api_keys"]:
        assert stat.S_IMODE((secrets / private).stat().st_mode) == 0o600, private
    assert stat.S_IMODE((cluster_dir / ".env").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((secrets / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "mqtt.example.com" in names  # TLS ends on the nodes: their certificate names the public host
    assert len(set(env.values())) == len(env), "every secret is drawn separately"


def test_init_refuses_to_overwrite(cluster_dir):
    with pytest.raises(tool.ClusterError, match="already initialised"):
        tool.init(cluster_dir, "other.example.com")


def test_add_device_then_reset_its_password(cluster_dir, emqx):
    first = tool.add_device(cluster_dir, "pi-7", api_url=emqx.url)
    assert emqx.users["pi-7"] == {"password": first.password, "is_superuser": False}
    assert emqx.requests[0][:2] == ("POST", USERS)
    assert first.url == "mqtts://mqtt.example.com:8883" and first.ca_file == cluster_dir / "secrets" / "ca.crt"
    assert f"mqtts://pi-7:{first.password}@mqtt.example.com:8883" in first.instructions()
    second = tool.add_device(cluster_dir, "pi-7", api_url=emqx.url)  # like mosquitto_passwd -b: a new password
    assert second.password != first.password and emqx.users["pi-7"]["password"] == second.password
    assert [r[:2] for r in emqx.requests[1:]] == [("POST", USERS), ("PUT", f"{USERS}/pi-7")]


@pytest.mark.parametrize("bad", ["a/b", "#", "+", "", "x" * 65])
def test_names_outside_fedge_alphabet_never_reach_emqx(cluster_dir, emqx, bad):
    with pytest.raises(ValueError):
        tool.add_device(cluster_dir, bad, api_url=emqx.url)
    assert emqx.requests == []


def test_remove_device_deletes_the_account_and_disconnects_it(cluster_dir, emqx):
    tool.add_device(cluster_dir, "pi-7", api_url=emqx.url)
    emqx.connected.add(tool.agent_client_id("pi-7"))
    assert tool.remove_device(cluster_dir, "pi-7", api_url=emqx.url) is True
    assert "pi-7" not in emqx.users and not emqx.connected
    with pytest.raises(tool.ClusterError, match="no device"):
        tool.remove_device(cluster_dir, "pi-7", api_url=emqx.url)
    emqx.requests.clear()
    with pytest.raises(tool.ClusterError, match="aggregator"):
        tool.remove_device(cluster_dir, AGGREGATOR_USER, api_url=emqx.url)
    assert emqx.requests == []


def test_users_are_listed_across_pages(cluster_dir, emqx):
    for i in range(5):
        tool.add_device(cluster_dir, f"pi-{i}", api_url=emqx.url)
    env = tool.read_env(cluster_dir / ".env")
    api = tool.EmqxApi(emqx.url, env["EMQX_API_KEY"], env["EMQX_API_SECRET"])
    assert list(api.users(page_size=2)) == [f"pi-{i}" for i in range(5)]


def test_a_wrong_key_is_a_clear_error(cluster_dir, emqx):
    api = tool.EmqxApi(emqx.url, "fedge-provisioning", "wrong")
    with pytest.raises(tool.ClusterError, match="401"):
        api.set_user("pi-7", "pw")


def test_command_line(cluster_dir, emqx, capsys):
    assert tool.main(["add-device", "pi-7", "--dir", str(cluster_dir), "--api", emqx.url]) == 0
    assert emqx.users["pi-7"]["password"] in capsys.readouterr().out
    assert tool.main(["list-devices", "--dir", str(cluster_dir), "--api", emqx.url]) == 0
    assert capsys.readouterr().out.split() == ["pi-7"]
    assert tool.main(["remove-device", "pi-9", "--dir", str(cluster_dir), "--api", emqx.url]) == 1
    assert "no device 'pi-9'" in capsys.readouterr().err
    assert tool.main(["add-device", "pi-7", "--dir", str(cluster_dir), "--api", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the EMQX API" in capsys.readouterr().err


def test_the_kicked_client_id_is_the_agents():
    agent = (Path(__file__).resolve().parents[2] / "edge_agent" / "agent.py").read_text()
    assert 'f"fedge-agent-{self.config.client_id}"' in agent
    assert tool.agent_client_id("pi-7") == "fedge-agent-pi-7"
