"""Provision deploy/cluster: its secrets once, then device accounts through EMQX's REST API.

    python deploy/cluster/cluster.py init --host mqtt.example.com
    docker compose -f deploy/cluster/docker-compose.yml up -d
    python deploy/cluster/cluster.py add-device pi-7       # prints the device's URL and password
    python deploy/cluster/cluster.py remove-device pi-7    # deletes the account, disconnects the device
    python deploy/cluster/cluster.py list-devices

The EMQX counterpart of ``fedge broker init --tls DIR`` / ``add-device`` / ``remove-device`` for
Mosquitto (broker/provision.py), with the same rules: usernames are fedge client ids
(``[A-Za-z0-9._-]``, what the ACL's ``${username}`` rules expect), passwords are random 192-bit
tokens shown once, and the aggregator's account cannot be removed. ``init`` writes:

    secrets/ca.crt, ca.key          the fleet's CA (devices trust only it); key 0600
    secrets/server.crt, server.key  the nodes' certificate, for --host (the name devices dial)
    secrets/users.csv               the aggregator's account: EMQX loads it when the cluster's
                                    user database is first created (authentication.bootstrap_file)
    secrets/api_keys                a REST API key, ``key:secret``, loaded at every start (api_key.bootstrap_file)
    .env                            docker compose's variables: node cookie, dashboard and aggregator
                                    passwords, and what this script needs (API key, public host)

EMQX runs as uid 1000 in its container: the secrets must be readable by it (done here when run as root).
Only the standard library and fedge itself are used; the API is EMQX 5's ``/api/v5``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broker.provision import AGGREGATOR_USER, Credentials, make_certificates
from fedge_contract.topics import check_name

HERE = Path(__file__).resolve().parent
AUTHENTICATOR = "password_based:built_in_database"  # the id of authentication[0] in emqx/emqx.conf
EMQX_UID = 1000  # the `emqx` user of the emqx/emqx-docker images
API_KEY_NAME = "fedge-provisioning"
DEFAULT_API_URL = "http://127.0.0.1:18083"  # emqx1's dashboard port, published on the host's loopback
DEFAULT_PORT = 8883


def agent_client_id(device: str) -> str:
    """The MQTT client id a fedge agent uses (edge_agent/agent.py): what remove-device disconnects."""
    return f"fedge-agent-{device}"


class ClusterError(RuntimeError):
    """Something this script cannot do; the message says what to do instead."""


def read_env(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a compose .env file (comments and blank lines skipped)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ClusterError(f"{path} is missing: run 'python deploy/cluster/cluster.py init --host NAME' first") from None
    env = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            env[key.strip()] = value.strip()
    return env


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def init(folder: Path, host: str, port: int = DEFAULT_PORT, api_url: str = DEFAULT_API_URL) -> dict[str, str]:
    """Write ``folder``/secrets and ``folder``/.env (see the module docstring); returns the .env values."""
    secrets_dir, env_file = folder / "secrets", folder / ".env"
    if env_file.exists() or (secrets_dir.exists() and any(secrets_dir.iterdir())):
        raise ClusterError(f"{folder} is already initialised ({env_file}, {secrets_dir}): remove both to start over")
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    make_certificates(secrets_dir, [host, "localhost", "127.0.0.1"])
    env = {
        "EMQX_NODE_COOKIE": secrets.token_hex(32),
        "EMQX_DASHBOARD_PASSWORD": secrets.token_urlsafe(18),
        "FEDGE_AGGREGATOR_PASSWORD": secrets.token_urlsafe(24),
        "EMQX_API_KEY": API_KEY_NAME,
        "EMQX_API_SECRET": secrets.token_urlsafe(32),
        "EMQX_API_URL": api_url,
        "FEDGE_PUBLIC_HOST": host,
        "FEDGE_PUBLIC_PORT": str(port),
    }
    # is_superuser must stay false: a superuser skips the ACL
    _write_secret(secrets_dir / "users.csv", f"user_id,password,is_superuser\n{AGGREGATOR_USER},{env['FEDGE_AGGREGATOR_PASSWORD']},false\n")
    _write_secret(secrets_dir / "api_keys", f"{env['EMQX_API_KEY']}:{env['EMQX_API_SECRET']}\n")
    _write_secret(env_file, "# made by deploy/cluster/cluster.py init; docker compose reads it. Keep it private.\n"
                  + "".join(f"{key}={value}\n" for key, value in env.items()))
    if os.geteuid() == 0:
        for path in [secrets_dir, *secrets_dir.iterdir()]:
            os.chown(path, EMQX_UID, EMQX_UID)
    elif os.getuid() != EMQX_UID:
        print(f"note: EMQX reads {secrets_dir} as uid {EMQX_UID}: sudo chown -R {EMQX_UID}:{EMQX_UID} {secrets_dir}", file=sys.stderr)
    return env


class EmqxApi:
    """The few EMQX 5 REST calls that provisioning needs, authenticated with an API key."""

    def __init__(self, url: str, key: str, secret: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._auth = "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()

    def _users_path(self, user_id: str | None = None) -> str:
        path = f"/api/v5/authentication/{urllib.parse.quote(AUTHENTICATOR, safe='')}/users"
        return path if user_id is None else f"{path}/{urllib.parse.quote(user_id, safe='')}"

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise ClusterError(f"cannot reach the EMQX API at {self.url} ({exc}): is the cluster up? "
                               "(docker compose -f deploy/cluster/docker-compose.yml ps)") from None
        if status == 401:
            raise ClusterError(f"the EMQX API at {self.url} refused the key in .env (401): check secrets/api_keys is mounted")
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def _fail(self, what: str, status: int, answer: Any) -> ClusterError:
        return ClusterError(f"{what}: EMQX answered {status} {answer}")

    def set_user(self, user_id: str, password: str) -> None:
        """Create the account, or reset its password if it exists (as mosquitto_passwd -b does)."""
        body = {"user_id": user_id, "password": password, "is_superuser": False}
        status, answer = self.request("POST", self._users_path(), body)
        if status == 409:  # already exists
            status, answer = self.request("PUT", self._users_path(user_id), {"password": password, "is_superuser": False})
        if status not in (200, 201):
            raise self._fail(f"could not set the password of {user_id!r}", status, answer)

    def delete_user(self, user_id: str) -> None:
        status, answer = self.request("DELETE", self._users_path(user_id))
        if status == 404:
            raise ClusterError(f"no device {user_id!r} in the cluster's user database")
        if status != 204:
            raise self._fail(f"could not remove {user_id!r}", status, answer)

    def kick(self, client_id: str) -> bool:
        """Disconnect ``client_id`` and discard its session; False if it was not connected."""
        status, answer = self.request("DELETE", f"/api/v5/clients/{urllib.parse.quote(client_id, safe='')}")
        if status not in (204, 404):
            raise self._fail(f"could not disconnect {client_id!r}", status, answer)
        return status == 204

    def users(self, page_size: int = 1000) -> Iterator[str]:
        page = 1
        while True:
            status, answer = self.request("GET", f"{self._users_path()}?page={page}&limit={page_size}")
            if status != 200 or not isinstance(answer, dict):
                raise self._fail("could not list users", status, answer)
            data = answer.get("data") or []
            yield from (str(user["user_id"]) for user in data)
            meta = answer.get("meta") or {}
            if not data or not meta.get("hasnext", len(data) == page_size):
                return
            page += 1


def _api(env: dict[str, str], url: str | None) -> EmqxApi:
    return EmqxApi(url or env.get("EMQX_API_URL", DEFAULT_API_URL), env["EMQX_API_KEY"], env["EMQX_API_SECRET"])


def add_device(folder: Path, device: str, *, api_url: str | None = None) -> Credentials:
    """Create (or reset the password of) ``device``'s account; the password is returned once."""
    check_name("client id", device)
    env = read_env(folder / ".env")
    password = secrets.token_urlsafe(24)
    _api(env, api_url).set_user(device, password)
    url = f"mqtts://{env['FEDGE_PUBLIC_HOST']}:{env['FEDGE_PUBLIC_PORT']}"
    return Credentials(device, password, url, folder / "secrets" / "ca.crt")


def remove_device(folder: Path, device: str, *, api_url: str | None = None) -> bool:
    """Delete ``device``'s account, then disconnect it (a live connection outlives its account)."""
    check_name("client id", device)
    if device == AGGREGATOR_USER:
        raise ClusterError("refusing to remove the aggregator's account")
    api = _api(read_env(folder / ".env"), api_url)
    api.delete_user(device)
    return api.kick(agent_client_id(device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["init", "add-device", "remove-device", "list-devices"])
    parser.add_argument("device", nargs="?", metavar="ID", help="device (client) id for add-device/remove-device")
    parser.add_argument("--host", help="init: the name devices use to reach the cluster (in the certificate)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="init: the devices' TLS port (default 8883)")
    parser.add_argument("--api", help=f"EMQX REST API base URL (default: .env's EMQX_API_URL, {DEFAULT_API_URL})")
    parser.add_argument("--dir", type=Path, default=HERE, help="the deploy/cluster folder (default: this script's)")
    args = parser.parse_args(argv)
    try:
        if args.action == "init":
            if not args.host:
                parser.error("init needs --host NAME (the name devices dial)")
            init(args.dir, args.host, args.port, args.api or DEFAULT_API_URL)
            print(f"wrote {args.dir / 'secrets'} and {args.dir / '.env'}; next: "
                  f"docker compose -f {args.dir / 'docker-compose.yml'} up -d")
        elif args.action == "list-devices":
            env = read_env(args.dir / ".env")
            for user in _api(env, args.api).users():
                if user != AGGREGATOR_USER:
                    print(user)
        elif not args.device:
            parser.error(f"{args.action} needs a device ID")
        elif args.action == "add-device":
            print(add_device(args.dir, args.device, api_url=args.api).instructions())
        else:
            kicked = remove_device(args.dir, args.device, api_url=args.api)
            print(f"removed {args.device}" + ("; its connection was closed" if kicked else ""))
    except (ClusterError, ValueError) as exc:
        print(f"cluster.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
