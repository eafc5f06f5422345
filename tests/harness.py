"""Real servers and worker processes for the tests and for bench/: one harness, two users.

The pytest fixtures (tests/conftest.py, tests/e2e/conftest.py, tests/services.py) and the
benchmarks (bench/run.py, bench/middleware.py) start PostgreSQL databases, private Redis
servers and `celery worker` processes through these functions, so a fix to how a worker is
started, waited for or stopped reaches both. Nothing here imports pytest: a failure raises
RuntimeError, which a fixture turns into a failure or a skip.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from creditworker import CreditService
from creditworker.settings import Settings
from creditworker.worker import commands
from producers import CreditClient


def free_port() -> int:
    """A port nothing listens on now (the one helper every test that starts a server uses)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def port_answers(url: str, default_port: int, timeout: float = 2.0) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def start_redis_server(binary: str, port: int, directory: str) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on 127.0.0.1:`port` (no persistence), ready to answer."""
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not port_answers(f"redis://127.0.0.1:{port}", port, timeout=0.5):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"{binary} did not start on port {port}")
        time.sleep(0.05)
    return server


@contextmanager
def fresh_database(
    server_url: str, prefix: str = "cw_test", isolation: str = "AUTOCOMMIT"
) -> Iterator[str]:
    """A database of its own on `server_url` (PostgreSQL or MySQL); dropped afterwards."""
    name = unique_name(prefix)
    admin = create_engine(server_url, isolation_level=isolation)
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        force = " WITH (FORCE)" if admin.dialect.name == "postgresql" else ""
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


def redis_db(url: str, db: int) -> str:
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    return f"{base}/{db}"


def worker_env(
    workdir: Path, database_url: str, broker_url: str, **extra: str
) -> dict[str, str]:
    """The environment of a worker process: the caller's, without its CREDITWORKER_*
    settings, plus these (`extra` may replace any of them)."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("CREDITWORKER_")
    }
    env.update(
        CREDITWORKER_DATABASE_URL=database_url,
        CREDITWORKER_BROKER_URL=broker_url,
        CREDITWORKER_LEDGER_PATH=str(workdir / "ledger.jsonl"),
        CREDITWORKER_DATA_DIR=str(workdir / ".creditworker"),
        C_FORCE_ROOT="1",
    )
    env.update(extra)
    return env


def with_checkout_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this checkout first on PYTHONPATH, so that a child process finds the test
    suite's own Celery apps (`celery -A tests.faults.kill_point`, `tests.faults.term_point`)."""
    root = str(Path(__file__).resolve().parents[1])
    return {**env, "PYTHONPATH": f"{root}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else root}


def launch(argv: list[str], env: dict[str, str], workdir: Path,
           log_path: Path) -> subprocess.Popen[bytes]:
    """`argv` in a process group of its own (so `stop_group` reaches its pool children),
    its output appended to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_answers(process: subprocess.Popen[bytes], app: Celery, log_path: Path, *,
                       hostname: str | None = None, timeout: float = 60) -> None:
    """Until the worker (the one named `hostname`, if given) answers a ping. The worker
    exiting is the product's failure; the caller's own client failing to reach a broker
    that has just restarted is not, so that is retried until the deadline (tests/faults
    restart the broker under the client)."""
    deadline = time.monotonic() + timeout
    destination = [hostname] if hostname else None
    client_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited: {log_path.read_text()[-3000:]}")
        try:
            if app.control.ping(destination=destination, timeout=1.0):
                return
        except Exception as exc:  # noqa: BLE001 (the harness's connection; see above)
            client_error = exc
            time.sleep(0.5)
    raise RuntimeError(
        f"worker not ready (the caller's client last failed with {client_error!r}): "
        f"{log_path.read_text()[-3000:]}"
    )


def stop_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
               timeout: float = 30) -> None:
    """Signal the whole process group; SIGKILL it if it has not exited within `timeout`."""
    _stop(process, lambda signal_number: os.killpg(process.pid, signal_number), sig, timeout)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM one process (not its group: a test's `celery beat` shares the test run's); SIGKILL
    it if it has not exited within `timeout`. Seen: a beat on RabbitMQ that got SIGTERM while
    publishing closed its connection from the signal handler and hung there for good (before
    creditworker/worker/beat_stop.py; the timeout stays for any other hang)."""
    _stop(process, process.send_signal, signal.SIGTERM, timeout)


def _stop(process: subprocess.Popen[bytes], send: Callable[[int], None], sig: int, timeout: float) -> None:
    """`send(sig)`, wait up to `timeout` for `process` to exit, then `send(SIGKILL)`."""
    try:
        send(sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(10)


@dataclass
class RunningWorker:
    """A `celery worker` process plus a client and an engine on the same database.

    `hostname`: the node name the worker is started with, and the only one a readiness ping
    asks (a benchmark runs several workers on one broker)."""

    env: dict[str, str]
    workdir: Path
    engine: Engine
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    hostname: str | None = None
    stop_timeout: float = 30
    settings: Settings = field(init=False)
    client: CreditClient = field(init=False)
    service: CreditService = field(init=False)

    def __post_init__(self) -> None:
        self.settings = Settings(
            broker_url=self.env["CREDITWORKER_BROKER_URL"],
            result_backend=self.env.get("CREDITWORKER_RESULT_BACKEND"),
            data_dir=str(self.workdir / ".creditworker"),
        )
        self.client = CreditClient(self.settings)
        self.service = CreditService(self.engine)

    @property
    def broker_url(self) -> str:
        return self.settings.broker_url

    @property
    def result_backend(self) -> str:
        return str(self.client.app.conf.result_backend)

    def start(self, command: list[str] | None = None, *, timeout: float = 60) -> None:
        """Start the worker (`commands.WORKER`, the command line of `creditworker up`, unless
        given another) and wait until it answers; stopped again if it never does."""
        argv = list(command or commands.WORKER)
        if self.hostname:
            argv.append(f"--hostname={self.hostname}")
        self.process = launch(argv, self.env, self.workdir, self.log_path)
        try:
            self.wait_ready(timeout)
        except RuntimeError:
            self.stop(signal.SIGKILL)
            raise

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.process is not None
        wait_until_answers(self.process, self.client.app, self.log_path,
                           hostname=self.hostname, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> None:
        if self.process is None:
            return
        stop_group(self.process, sig, self.stop_timeout if timeout is None else timeout)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the whole worker, main process and pool children."""
        self.stop(signal.SIGKILL)
