"""Smoke test of a fresh install: what a new user runs, in a venv of its own.

    python tests/smoke/fresh_install.py [--project DIR]

1. `pip install .` (no extras) into a new venv, then the README's PostgreSQL + Redis path:
   `creditworker up` on a fresh PostgreSQL database and Redis, one add and one deduct
   through the producer, and the balance checked;
2. `pip install '.[http]'`, then `creditworker serve` answering a deduct and a balance read.

The test suite cannot see a missing runtime dependency (its dev extras pull in a lot), so
.ci/run runs this after it. Only the standard library is used here; everything creditworker
needs comes from the new venv. Services: PostgreSQL at CREDITWORKER_SMOKE_POSTGRES_URL
(default the local server; a database of its own is created and dropped), Redis at
CREDITWORKER_SMOKE_REDIS_URL, else a private `redis-server` from PATH, else database 1 of
the local Redis (one no test uses). Everything it started is killed and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POSTGRES = os.environ.get(
    "CREDITWORKER_SMOKE_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
SHARED_REDIS = "redis://127.0.0.1:6379/1"
MARKER = "CREDITWORKER_SMOKE_RUN"
"""Set in every process the smoke starts, so it finds all their descendants at the end."""
API_KEY = "smoke-key"
NOT_COPIED = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".creditworker", "*.db", "*.jsonl",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "results", ".venv*",
)

PRODUCER = """
from producers import CreditClient
client = CreditClient()
client.add_credits("alice", 100).get(timeout=60)
entry = client.deduct_credits("alice", 30).get(timeout=60)
balance = client.get_user_credits_info("alice").get(timeout=60)
print(entry.balance_after, balance.available)
"""

CREATE_OR_DROP = """
import sys
from sqlalchemy import create_engine, text
engine = create_engine(sys.argv[1], isolation_level="AUTOCOMMIT")
with engine.connect() as connection:
    connection.execute(text(sys.argv[2]))
"""


class SmokeFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Smoke:
    def __init__(self, project: Path, workdir: Path) -> None:
        self.workdir = workdir
        self.source = workdir / "source"
        self.venv = workdir / "venv"
        self.rundir = workdir / "run"
        self.project = project
        self.token = uuid.uuid4().hex
        self.database = f"cw_smoke_{os.getpid()}_{self.token[:8]}"
        self.redis: subprocess.Popen[bytes] | None = None
        self.database_created = False

    # ------------------------------------------------------------ steps

    def run(self) -> None:
        started = time.monotonic()
        shutil.copytree(self.project, self.source, ignore=NOT_COPIED)
        # No pip in the venv (ensurepip takes half a minute on a busy machine): this
        # interpreter's pip installs into it.
        self.step("venv", [sys.executable, "-m", "venv", "--without-pip", str(self.venv)])
        self.pip_install(str(self.source))
        self.rundir.mkdir()
        env = self.app_env()
        self.step("create database", [self.python, "-c", CREATE_OR_DROP, POSTGRES,
                                      f"CREATE DATABASE {self.database}"])
        self.database_created = True

        up = self.start("up", [self.bin("creditworker"), "up"], env)
        answer = self.step("producer", [self.python, "-c", PRODUCER], env=env, timeout=120,
                           alongside=up)
        if answer.split() != ["70", "70"]:
            raise SmokeFailed(f"producer: expected balance 70 after the deduct and read, got {answer!r}")
        print(f"smoke: plain install: up + producer on PostgreSQL and {env['CREDITWORKER_BROKER_URL']} ok")

        self.pip_install(f"{self.source}[http]")
        port = free_port()
        serve = self.start("serve", [self.bin("creditworker"), "serve", "--port", str(port)],
                           {**env, "CREDITWORKER_API_KEYS": API_KEY})
        self.wait_for_port(serve, port)
        entry = self.request(port, "POST", "/credits/deduct?wait=true", {"user_id": "alice", "amount": 10})
        balance = self.request(port, "GET", "/credits/balance/alice")
        if entry.get("balance_after") != 60 or balance.get("available") != 60:
            raise SmokeFailed(f"serve: expected balance 60, got {entry} and {balance}")
        print("smoke: http extra: serve answered a deduct and a balance read ok")

        self.stop(serve, signal.SIGTERM)
        if self.stop(up, signal.SIGINT) != 0:
            raise SmokeFailed(f"up exited with {up.returncode}: {self.log_tail('up')}")
        print(f"smoke: passed in {time.monotonic() - started:.0f} s")

    # ------------------------------------------------------------ helpers

    @property
    def python(self) -> str:
        return self.bin("python")

    def bin(self, program: str) -> str:
        return str(self.venv / "bin" / program)

    def base_env(self) -> dict[str, str]:
        """The caller's environment without its creditworker settings or Python path, and
        with the marker."""
        env = {
            name: value for name, value in os.environ.items()
            if not name.startswith("CREDITWORKER_") and name not in ("PYTHONPATH", "PYTHONHOME")
        }
        env[MARKER] = self.token
        return env

    def app_env(self) -> dict[str, str]:
        """A shell in the activated venv, configured for PostgreSQL and Redis."""
        env = self.base_env()
        database_url = POSTGRES.rsplit("/", 1)[0] + f"/{self.database}"
        env.update({
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(self.venv),
            "CREDITWORKER_DATABASE_URL": database_url,
            "CREDITWORKER_BROKER_URL": self.redis_url(),
            "C_FORCE_ROOT": "1",
        })
        return env

    def redis_url(self) -> str:
        given = os.environ.get("CREDITWORKER_SMOKE_REDIS_URL")
        if given:
            return given
        binary = shutil.which("redis-server")
        if binary is None:
            return SHARED_REDIS
        port = free_port()
        self.redis = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not answers(port):
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise SmokeFailed(f"{binary} did not start on port {port}")
            time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    def pip_install(self, requirement: str) -> None:
        self.step(f"pip install {Path(requirement).name}", [
            sys.executable, "-m", "pip", "--python", self.python, "install", "--quiet",
            "--disable-pip-version-check", "--no-compile", requirement,
        ], timeout=600)

    def step(
        self, name: str, argv: list[str], env: dict[str, str] | None = None,
        timeout: float = 120, alongside: subprocess.Popen[bytes] | None = None,
    ) -> str:
        """Run `argv` to completion; fail with its output (and `alongside`'s log) if it fails."""
        began = time.monotonic()
        with open(self.workdir / "step.log", "wb") as log:
            process = subprocess.Popen(
                argv, cwd=self.rundir if self.rundir.exists() else self.workdir,
                env=env or self.base_env(),
                stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )
            try:
                output, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
        if process.returncode != 0:
            errors = (self.workdir / "step.log").read_text(errors="replace")[-4000:]
            extra = f"\n--- up's log:\n{self.log_tail('up')}" if alongside is not None else ""
            raise SmokeFailed(f"{name} failed ({process.returncode}):\n{errors}{extra}")
        print(f"smoke: {name}: {time.monotonic() - began:.1f} s", flush=True)
        return output.decode()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:  # the child keeps its own copy
            return subprocess.Popen(argv, cwd=self.rundir, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for_port(self, process: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SmokeFailed(f"serve did not listen on {port}: {self.log_tail('serve')}")
            time.sleep(0.1)

    def request(self, port: int, method: str, path: str, body: object = None) -> dict[str, object]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answer: dict[str, object] = json.load(response)
                return answer
        except OSError as exc:
            raise SmokeFailed(f"serve: {method} {path}: {exc}\n{self.log_tail('serve')}") from exc

    def stop(self, process: subprocess.Popen[bytes], sig: int, timeout: float = 60) -> int:
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise SmokeFailed(f"{process.args!r} did not stop within {timeout} s") from None

    def log_tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def cleanup(self) -> list[int]:
        """Kill every process this run started (found by the marker in their environment:
        `up` starts its children in sessions of their own), then its server and database."""
        killed = [pid for pid in marked_processes(self.token) if kill(pid)]
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(30)
        if self.database_created:
            self.step("drop database", [self.python, "-c", CREATE_OR_DROP, POSTGRES,
                                        f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)"])
        return killed


def marked_processes(token: str) -> list[int]:
    needle = f"{MARKER}={token}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=ROOT, help="the checkout to install")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up when CI cancels
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cw-smoke-") as workdir:
        smoke = Smoke(args.project.resolve(), Path(workdir))
        try:
            smoke.run()
        except SmokeFailed as failure:
            print(f"smoke: FAILED: {failure}", file=sys.stderr)
            return 1
        finally:
            leftovers = smoke.cleanup()
    print(f"smoke: cleaned up; {time.monotonic() - began:.0f} s in all", flush=True)
    if leftovers:  # a clean stop of `up` and `serve` leaves nothing running
        print(f"smoke: FAILED: {len(leftovers)} processes outlived the run (killed)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
