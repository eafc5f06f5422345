"""Private server instances that a fault test may stop and restart at will.

The shared PostgreSQL, Redis and RabbitMQ are never touched: each instance here has its own
data directory and port and is stopped when the test ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests import services

ROOT = Path(__file__).resolve().parents[2]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def _need(binary: str) -> str:
    system = Path("/usr/bin") / binary  # the distribution's server before a pip-bundled one
    path = (str(system) if system.exists() else shutil.which(binary)) or next(
        (str(p) for p in Path("/usr/lib/postgresql").glob(f"*/bin/{binary}")), None
    )
    if path is None:
        message = f"{binary} is not installed"
        if services.IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory (run as the `postgres` user under root)."""

    def __init__(self) -> None:
        self.initdb = _need("initdb")
        self.pg_ctl = str(Path(self.initdb).with_name("pg_ctl"))
        self.root = Path(tempfile.mkdtemp(prefix="cw-private-pg-"))
        self.data = self.root / "data"
        self.port = services.free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*self.as_user, self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust"],
            check=True, capture_output=True,
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-w",
             "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start"],
            check=True, capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            [*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"],
            check=False, capture_output=True,
        )

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def documented_redis_options() -> list[str]:
    """The persistence and eviction options of docker-compose.yml's Redis: what the fault
    tests run is what the README tells operators to run."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command: list[str] = compose["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    return command[1:]


class PrivateRedis:
    """A redis-server with the documented persistence (`documented_redis_options`) on a free
    port; `kill` SIGKILLs it, as a crash or the OOM killer would."""

    def __init__(self) -> None:
        self.binary = _need("redis-server")
        self.root = Path(tempfile.mkdtemp(prefix="cw-private-redis-"))
        self.port = services.free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
             "--save", "", *documented_redis_options()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
            self.process.wait(30)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRabbitMQ:
    """A RabbitMQ node of its own (own name, ports and database directory)."""

    def __init__(self) -> None:
        self.server = _need("rabbitmq-server")
        self.ctl = _need("rabbitmqctl")
        self.root = Path(tempfile.mkdtemp(prefix="cw-private-rabbit-"))
        self.port = services.free_port()
        self.node = f"cwfault{self.port}@localhost"
        if os.geteuid() == 0:
            shutil.chown(self.root, "rabbitmq", "rabbitmq")
        config = self.root / "rabbitmq.conf"
        config.write_text("loopback_users = none\n")
        if os.geteuid() == 0:
            shutil.chown(config, "rabbitmq", "rabbitmq")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(services.free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_ENABLED_PLUGINS": "",
            "RABBITMQ_PID_FILE": str(self.root / "pid"),
        }
        self.start()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.ctl, "-n", self.node, *args], env=self.env, capture_output=True, timeout=120, check=False)

    def start(self) -> None:
        subprocess.run([self.server, "-detached"], env=self.env, check=True, capture_output=True, timeout=60)
        self._ctl("wait", str(self.root / "pid"), "--timeout", "60")
        wait_port(self.port, timeout=90)

    def stop(self) -> None:
        self._ctl("stop")

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM, as a crash or the OOM killer would."""
        pid = int((self.root / "pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
