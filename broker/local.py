"""Run a local Mosquitto for development, tests and ``fedge simulate``.

LocalBroker is an async context manager: entering starts Mosquitto with the dev config on a
loopback port (a free one unless given) and returns once it accepts connections; leaving stops
it. With ``config_file`` it runs that config instead (e.g. a production folder made by
``broker.provision.init``; ``port`` must then be the one that config listens on). ``kill()``,
``stop()`` and ``start()`` exist so fault tests can crash and restart the same broker on the same
port with the same persistence folder.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.errors import BrokerNotFound, BrokerStartError

_SEARCH_PATH = ["/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/local/opt/mosquitto/sbin"]


def find_mosquitto() -> str:
    """Path of the mosquitto binary (it lives in /usr/sbin on Debian, often off a user's PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path=os.pathsep.join(_SEARCH_PATH))
    if not found:
        raise BrokerNotFound(
            "mosquitto is not installed: on Debian/Ubuntu run 'sudo apt-get install mosquitto' "
            "(or 'make demo', which installs it), on macOS 'brew install mosquitto'"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def render_dev_config(*, host: str, port: int, data_dir: Path) -> str:
    template = resources.files("broker").joinpath("mosquitto/dev.conf").read_text()
    return template.format(host=host, port=port, data_dir=data_dir, user=getpass.getuser())


@dataclass
class LocalBroker:
    port: int = 0  # 0 = pick a free loopback port
    host: str = "127.0.0.1"
    data_dir: Path | None = None  # None = a temporary folder removed on exit
    startup_timeout: float = 10.0
    config_file: Path | None = None  # run this config as is instead of the rendered dev config
    tls: bool = False  # the config's listener speaks TLS (only changes ``url``)
    on_log_line: Callable[[str], None] | None = None  # each line Mosquitto logs, as it comes (``fedge broker serve`` shows them)
    _process: asyncio.subprocess.Process | None = field(default=None, init=False, repr=False)
    _tempdir: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)
    _log_task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    log_lines: list[str] = field(default_factory=list, init=False, repr=False)
    _log_changed: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)  # a new log line (wait_for_log)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def __aenter__(self) -> Self:
        if self.data_dir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="fedge-broker-")
            self.data_dir = Path(self._tempdir.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        try:
            await self.start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await asyncio.shield(self.stop())
        finally:
            if self._tempdir is not None:
                self._tempdir.cleanup()
                self._tempdir = None

    async def start(self) -> None:
        """Start Mosquitto and return once it listens (raises BrokerStartError with its log if not)."""
        assert self.data_dir is not None, "enter the context manager first"
        config = self.config_file
        if config is None:
            config = self.data_dir / "mosquitto.conf"
            config.write_text(render_dev_config(host=self.host, port=self.port, data_dir=self.data_dir))
        self.log_lines = []
        self._process = await asyncio.create_subprocess_exec(
            find_mosquitto(), "-c", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        ready = asyncio.get_running_loop().create_future()
        self._log_task = asyncio.create_task(self._read_log(self._process, ready), name="mosquitto-log")
        try:
            await asyncio.wait_for(ready, self.startup_timeout)
        except (TimeoutError, BrokerStartError):
            await self.stop()
            log = "\n".join(self.log_lines[-20:])
            raise BrokerStartError(f"mosquitto did not start on {self.host}:{self.port}:\n{log}") from None

    async def _read_log(self, process: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log_lines.append(line)
            del self.log_lines[:-500]
            self._log_changed.set()
            if self.on_log_line is not None:
                self.on_log_line(line)
            # Mosquitto says "Opening ipv4 listen socket on port N." then "... running" once it listens.
            if not ready.done() and " running" in line:
                ready.set_result(None)
        if not ready.done():
            ready.set_exception(BrokerStartError("mosquitto exited"))

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout`` s (it saves persistence on TERM)."""
        await self._terminate(signal.SIGTERM, timeout)

    async def wait_for_log(self, predicate: Callable[[list[str]], bool]) -> None:
        """Return once ``predicate(log_lines)`` holds, checked again at each new line Mosquitto logs."""
        while not predicate(self.log_lines):
            self._log_changed.clear()
            await self._log_changed.wait()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password and ACL files (after add/remove-device)."""
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGHUP)

    async def kill(self) -> None:
        """SIGKILL: a crash, losing what was not autosaved."""
        await self._terminate(signal.SIGKILL, 10.0)

    async def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._log_task is not None:
            await self._log_task
            self._log_task = None
