"""`creditworker up`: migrate, then run worker and beat (and Flower) until Ctrl-C.

The children are started with the canonical command lines of `commands`, so `up` runs the
same processes as docker-compose and the end-to-end tests. Supervision, in four rules:

- A child dies with `up`: on Linux each child asks the kernel for SIGTERM when `up` dies
  (`PR_SET_PDEATHSIG`), so `up` killed by SIGKILL or the OOM killer leaves no orphaned beat
  to double the schedule when `up` starts again (tests/e2e/test_supervision.py). SIGTERM
  gives the worker its warm shutdown; Celery's pool processes already die with the worker.
- A child that exits is restarted, as docker's restart policy would (a Celery worker can
  exit on a broker outage: see the README's reliability section). One that keeps exiting is
  reported in one line with the last error it printed; then `up` stops everything.
- Flower is optional: if it cannot start (its port is taken, say) or keeps exiting, `up`
  says why and runs on without it.
- Ctrl-C or SIGTERM stops them all with a warm shutdown: running tasks finish and
  unacknowledged messages go back to the broker.

Each child's output goes through a pipe to `up`'s standard output, each line prefixed with
the child's name; reading it is how `up` knows why a child exited. One thread does it all,
the same that forks the children: a parent-death signal belongs to the thread that forked.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import select
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from creditworker.settings import Settings, broker_kind, result_backend_url
from creditworker.worker import commands

SHUTDOWN_GRACE_SECONDS = 30
"""How long Ctrl-C waits for running tasks before killing what is left."""
MAX_RESTARTS = 5
"""Restarts of one child allowed within RESTART_WINDOW_SECONDS before `up` gives up."""
RESTART_WINDOW_SECONDS = 60.0
STARTUP_SECONDS = 30.0
"""An optional child that exits this soon after its first start could not start at all."""
FLOWER_USER = "admin"
"""The user of the password `up --flower` generates when no FLOWER_BASIC_AUTH is given."""

_BROKER_LOST = "Cannot connect to "
"""What Celery logs each time it retries a broker it cannot reach."""
_PR_SET_PDEATHSIG = 1
_LONGEST_LINE = 65536
_LOGGED_ERROR = re.compile(
    # a Celery log record at ERROR or CRITICAL: "[2026-01-01 00:00:00,000: ERROR/MainProcess] ..."
    r"^\[[^\]]*\b(?:ERROR|CRITICAL)/[^\]]*\]\s*(?P<celery>.*)$"
    # a Flower (tornado) log record at ERROR or CRITICAL: "[E 261125 16:36:19 app:42] ..."
    r"|^\[[EC] \d{6} [^\]]*\]\s*(?P<tornado>.*)$"
    # click's usage error: "Error: Invalid value for '-A' ..."
    r"|^(?P<click>Error: .*)$"
)


@dataclass(frozen=True)
class Program:
    """A child `up` runs: its command line, extra environment, and whether `up` needs it."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False


@dataclass(frozen=True)
class FlowerOptions:
    port: int = 5555
    address: str = "127.0.0.1"
    basic_auth: str | None = None
    """"user:password[,user2:password2]"; None: `up` generates a password and prints it once."""


class LastError:
    """The last error a child printed, read line by line from its output.

    That is the last line of a Python traceback (the exception, as in
    "ModuleNotFoundError: No module named 'x'": the first line at the margin after
    "Traceback (most recent call last):"), or else a log record at ERROR or CRITICAL.
    """

    def __init__(self) -> None:
        self.message: str | None = None
        self._in_traceback = False

    def feed(self, line: str) -> None:
        line = line.rstrip()
        if line.startswith("Traceback (most recent call last):"):
            self._in_traceback = True
        elif self._in_traceback:
            if line and not line[0].isspace():
                self.message = line
                self._in_traceback = False
        elif match := _LOGGED_ERROR.match(line):
            self.message = (match.group("celery") or match.group("tornado") or match.group("click")).strip()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child SIGTERM when `up` dies (Linux).

    Elsewhere there is no such call: there, `up` killed by SIGKILL leaves its children running.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before the fork, not in the child
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # `up` died before the call: nobody would ever signal us
            os._exit(1)

    return set_parent_death_signal


def this_python(argv: list[str]) -> list[str]:
    """`celery ...` run by the interpreter that runs `up`, not whichever `celery` is first on
    PATH: `venv/bin/creditworker up` without an activated venv would otherwise start another
    installation's worker (or none)."""
    if argv and argv[0] == "celery":
        return [sys.executable, "-m", "celery", *argv[1:]]
    return argv


class Child:
    """One run of a program: the process, its unread output, the last error it printed."""

    def __init__(self, program: Program, preexec: Callable[[], None] | None) -> None:
        self.program = program
        self.process = subprocess.Popen(
            this_python(program.argv), env={**os.environ, **program.env} if program.env else None,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            # its own session: Ctrl-C reaches `up` alone, which stops the children in order.
            # preexec_fn is unsafe only with threads, and `up` runs none.
            start_new_session=True, preexec_fn=preexec,  # noqa: PLW1509
        )
        assert self.process.stdout is not None
        self.output = self.process.stdout
        os.set_blocking(self.output.fileno(), False)
        self.started_at = time.monotonic()
        self.last_error = LastError()
        self.told_broker_lost = False
        self._partial = b""

    def forward(self, out: Callable[[bytes], None]) -> bool:
        """Pass on what the child wrote, a line at a time; False once its output has ended."""
        try:
            chunk = os.read(self.output.fileno(), 65536)
        except BlockingIOError:
            return True
        if chunk:
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            if len(self._partial) > _LONGEST_LINE:  # output with no newline: pass it on anyway
                lines.append(self._partial)
                self._partial = b""
        else:
            lines = [self._partial] if self._partial else []
            self._partial = b""
        prefix = f"{self.program.name:<6} | ".encode()
        for line in lines:
            out(prefix + line + b"\n")
            text = line.decode(errors="replace")
            self.last_error.feed(text)
            if not self.told_broker_lost and _BROKER_LOST in text:
                self.told_broker_lost = True
                _warn(f"{self.program.name} lost the broker and keeps retrying it: check that "
                      "the broker runs and that CREDITWORKER_BROKER_URL names it")
        return bool(chunk)

    def drain(self, out: Callable[[bytes], None]) -> None:
        """Pass on the last words of an exited child (its traceback), then close its pipe.

        Its pool processes may hold the pipe open a moment longer: wait for them briefly.
        """
        deadline = time.monotonic() + 1.0
        while not self.output.closed and time.monotonic() < deadline:
            readable, _, _ = select.select([self.output], [], [], 0.2)
            if not readable or not self.forward(out):
                break
        self.output.close()

    def exit_cause(self, code: int) -> str:
        """Why the child exited: the signal that killed it, else the last error it printed."""
        if code < 0 or not self.last_error.message:
            return describe_exit(code)
        return self.last_error.message


class Supervisor:
    """Runs the programs until asked to stop or until a required one keeps exiting."""

    def __init__(self, programs: list[Program]) -> None:
        self.programs = {program.name: program for program in programs}
        self.children: dict[str, Child] = {}
        self.exits: dict[str, list[float]] = {program.name: [] for program in programs}
        self.selector = selectors.DefaultSelector()
        self.preexec = _die_with_parent()
        self.stop_requested = False

    def request_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stop_requested = True

    def run(self) -> int:
        """Supervise until Ctrl-C (0) or a required child that keeps exiting (1)."""
        for name in self.programs:
            self._start(name)
        exit_code = 0
        while not self.stop_requested:
            self._pump(0.2)
            for name, child in list(self.children.items()):
                code = child.process.poll()
                if code is None or self.stop_requested:
                    continue
                if not self._handle_exit(name, child, code):
                    exit_code = 1
                    break
            if exit_code:
                break
        if exit_code == 0:
            _tell(f"stopping: waiting for running tasks to finish (up to {SHUTDOWN_GRACE_SECONDS} s); "
                  "messages not yet acknowledged go back to the broker")
        self._stop()
        return exit_code

    def _start(self, name: str) -> None:
        child = Child(self.programs[name], self.preexec)
        self.children[name] = child
        self.selector.register(child.output, selectors.EVENT_READ, child)

    def _handle_exit(self, name: str, child: Child, code: int) -> bool:
        """Restart, drop (if optional) or give up on an exited child; False to stop all."""
        self._close(child)
        del self.children[name]
        now = time.monotonic()
        first_run = not self.exits[name]
        recent = [t for t in self.exits[name] if now - t < RESTART_WINDOW_SECONDS]
        self.exits[name] = [*recent, now]
        program = self.programs[name]
        cause = child.exit_cause(code)
        without_it = f"{' and '.join(self.children) or 'nothing'} keep running without it"
        if program.optional and first_run and now - child.started_at < STARTUP_SECONDS:
            _warn(f"{name} could not start: {cause}; {without_it}")
            return True
        if len(recent) >= MAX_RESTARTS:
            span = max(1, round(now - recent[0]))
            outcome = without_it if program.optional else "stopping"
            _warn(f"{name} keeps exiting ({len(recent) + 1} times in {span} s): {cause}; {outcome}")
            return program.optional
        detail = f" ({cause})" if cause != describe_exit(code) else ""
        _warn(f"{name} {describe_exit(code)}{detail}; restarting it")
        self._start(name)
        return True

    def _pump(self, timeout: float) -> None:
        """Forward the children's output for up to `timeout` seconds."""
        for key, _events in self.selector.select(timeout):
            child: Child = key.data
            if not child.forward(_write_stdout):
                self.selector.unregister(child.output)

    def _close(self, child: Child) -> None:
        if child.output in {key.fileobj for key in self.selector.get_map().values()}:
            self.selector.unregister(child.output)
        child.drain(_write_stdout)

    def _stop(self) -> None:
        """Warm shutdown: SIGTERM each main process, forward output while they finish."""
        for child in self.children.values():
            if child.process.poll() is None:
                # The main process only: Celery's warm shutdown stops its own pool after the
                # running tasks finish; a signal to the whole group would kill them mid-task.
                os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        while any(child.process.poll() is None for child in self.children.values()):
            if time.monotonic() >= deadline:
                for child in self.children.values():
                    if child.process.poll() is None:
                        _warn(f"{child.program.name} still running after {SHUTDOWN_GRACE_SECONDS} s; killing it")
                        os.killpg(child.process.pid, signal.SIGKILL)
                        child.process.wait()
                break
            self._pump(0.05)  # a child's exit is seen within this, not a fifth of a second later
        for child in self.children.values():
            self._close(child)
        self.children.clear()


def _write_stdout(line: bytes) -> None:
    try:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
    except (BrokenPipeError, ValueError):
        pass


def _tell(message: str) -> None:
    print(f"creditworker up: {message}", flush=True)


def _warn(message: str) -> None:
    print(f"creditworker up: {message}", file=sys.stderr, flush=True)


def _without_password(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url) if "@" in url else url


def _url_host(address: str) -> str:
    if address in ("", "0.0.0.0", "::"):
        return "<this host>"
    return f"[{address}]" if ":" in address else address


def flower_program(options: FlowerOptions) -> tuple[Program, str]:
    """Flower, and how to log in to it: the credentials go in its environment, not in `ps`."""
    basic_auth = options.basic_auth
    if basic_auth:
        users = ", ".join(pair.split(":", 1)[0] for pair in basic_auth.split(","))
        login = f"log in as {users} (password from FLOWER_BASIC_AUTH / --flower-basic-auth)"
    else:
        password = secrets.token_urlsafe(12)
        basic_auth = f"{FLOWER_USER}:{password}"
        login = (f"log in as {FLOWER_USER}, password {password} (made up for this run; "
                 "set FLOWER_BASIC_AUTH=user:password to choose)")
    where = f"http://{_url_host(options.address)}:{options.port}/"
    if options.address in ("", "0.0.0.0", "::"):
        where += " (all interfaces)"
    program = Program(
        "flower", commands.flower_command(options.port, address=options.address),
        env={"FLOWER_BASIC_AUTH": basic_auth}, optional=True,
    )
    return program, f"{where}, {login}"


def check_broker(settings: Settings) -> None:
    """A broker that does not answer at start is a setup error, said in one line: the worker
    would otherwise retry it a hundred times, printing only kombu's "Trying again"."""
    if broker_kind(settings.broker_url) == "filesystem":
        return
    from kombu import Connection

    from creditworker.contract.errors import ServiceUnavailable

    timeout = settings.broker_connect_timeout_seconds
    with Connection(settings.broker_url, connect_timeout=timeout) as connection:
        try:
            connection.ensure_connection(max_retries=1, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 (kombu raises the transport's own errors)
            raise ServiceUnavailable(
                f"cannot reach the broker {_without_password(settings.broker_url)} ({exc}): "
                "start it, or point CREDITWORKER_BROKER_URL at it") from None


def run_up(settings: Settings, flower: FlowerOptions | None = None) -> int:
    """Migrate, print what runs where, supervise until Ctrl-C; the exit code of `up`.
    `settings`: what the command read (the children read the same environment)."""
    from creditworker.storage.database import make_engine
    from creditworker.storage.migrate import upgrade

    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    check_broker(settings)
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    programs = [
        # With Flower beside it, the worker sends task events from its first task (Flower
        # alone would switch them on within 5 s of its start, or of a worker's restart).
        Program("worker", commands.WORKER, env={"CREDITWORKER_TASK_EVENTS": "true"} if flower else {}),
        Program("beat", commands.beat_command(str(data_dir / "celerybeat-schedule"))),
    ]
    embedded = broker_kind(settings.broker_url) == "filesystem"
    lines = [
        f"database  {engine.url.render_as_string()}",
        f"broker    {_without_password(settings.broker_url)}"
        + (f" (embedded: folders under {data_dir})" if embedded else ""),
        f"results   {_without_password(result_backend_url(settings))}",
        f"data dir  {data_dir} (beat schedule" + (", broker and results)" if embedded else ")"),
    ]
    if flower is not None:
        flower_child, flower_where = flower_program(flower)
        programs.append(flower_child)
        lines.append(f"flower    {flower_where}")
    names = [program.name for program in programs]
    _tell(f"starting {', '.join(names[:-1])} and {names[-1]}")
    for line in [*lines, "Ctrl-C stops everything (running tasks finish first)"]:
        print(f"  {line}", flush=True)

    supervisor = Supervisor(programs)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    exit_code = supervisor.run()
    if exit_code == 0:
        _tell("stopped")
    return exit_code
