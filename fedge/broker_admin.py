"""``fedge broker init|serve|add-device|remove-device|list-devices``: the production broker folder.

The work is in ``broker.provision``; this module only maps the command line onto it and prints
what an operator must copy to a device.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
from pathlib import Path

from broker import LocalBroker
from broker.provision import DEFAULT_PORT, BrokerFolder, ProvisionError, init
from fedge.running import run_until_stopped

DEFAULT_DIR = Path("fedge-broker")
_RELOAD = "then make a running broker re-read its accounts and CRL: kill -HUP <mosquitto pid> (or restart it)"
mosquitto_log = logging.getLogger("fedge.mosquitto")
_EPOCH = re.compile(r"^\d+: ")  # Mosquitto's own timestamp (log_timestamp): the log record has one


def run_broker_action(args: argparse.Namespace) -> int:
    folder = args.config_dir or DEFAULT_DIR
    if args.action == "init":
        broker, aggregator = init(folder, fleet=args.fleet, host=args.host or "localhost", port=args.port or DEFAULT_PORT, bind=args.bind,
                                  auth=args.auth, cert_port=args.cert_port)
        print(f"production broker for fleet {args.fleet!r} in {broker.path}")
        print(f"start it: fedge broker serve --config {broker.path}   (or: mosquitto -c {broker.config_file})")
        print("the aggregator's account:")
        print(aggregator.instructions())
        how = {"password": "", "certificate": " --cert", "both": " [--cert]"}[broker.auth]
        print(f"add each device: fedge broker add-device ID{how} --config {broker.path}")
        return 0
    broker = BrokerFolder(folder.resolve())
    broker.settings  # noqa: B018  (raises a clear error if the folder was never initialised)
    if args.action == "serve":
        return _serve(broker)
    if args.action == "list-devices":
        for name in broker.accounts():
            print(name)
        return 0
    if not args.device:
        raise ProvisionError(f"{args.action} needs the device id: fedge broker {args.action} ID --config {folder}")
    if args.action == "add-device" and args.cert:
        credentials = broker.add_certificate(args.device)
        print(f"device {args.device!r}: a client certificate (its earlier ones are revoked); copy to the device:")
        print(credentials.instructions())
    elif args.action == "add-device":
        credentials = broker.add_account(args.device)
        print(f"device {args.device!r} (a new password if it existed); copy to the device:")
        print(credentials.instructions())
    else:
        had_password = args.device in broker.password_accounts()
        certificates = len(broker.ca.issued_to(args.device))
        broker.remove_account(args.device)
        done = ["its password deleted"] if had_password else []
        if certificates:
            done.append(f"its {certificates} certificate(s) revoked in {broker.ca.crl_file}")
        print(f"device {args.device!r} removed: {', '.join(done)}")
    print(_RELOAD)
    return 0


def log_mosquitto_line(line: str) -> None:
    """Mosquitto's log through fedge's (--log-file, --log-json): who connected, who was refused and why, each reload."""
    mosquitto_log.info("%s", _EPOCH.sub("", line, count=1))


def _serve(broker: BrokerFolder) -> int:
    async def serve() -> None:
        async with LocalBroker(port=broker.port, host=str(broker.settings["host"]), data_dir=broker.path / "data",
                               config_file=broker.config_file, tls=True, on_log_line=log_mosquitto_line) as running:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, running.reload)
            urls = broker.url() if broker.auth != "both" else f"{broker.url()} (passwords) and {broker.certificate_url()} (certificates)"
            print(f"mosquitto (pid {running.pid}) serving {urls} with {broker.config_file}; "
                  "SIGHUP re-reads accounts, ACL and CRL, Ctrl-C stops", flush=True)
            await asyncio.Event().wait()

    return run_until_stopped(serve())
