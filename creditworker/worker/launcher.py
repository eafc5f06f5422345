"""`creditworker up`: migrate, then run worker and beat (and Flower) until Ctrl-C.

The children are started with the canonical command lines of `commands`, so `up` runs the
same processes as docker-compose and the end-to-end tests. A child that exits is restarted,
as docker's restart policy would (a Celery worker can exit on a broker outage: see the
README's reliability section); one that keeps crashing stops everything. Ctrl-C or SIGTERM
stops them all with a warm shutdown (running tasks finish, unacknowledged messages go back).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from creditworker.settings import get_settings
from creditworker.worker import commands

SHUTDOWN_GRACE_SECONDS = 30
MAX_RESTARTS = 5
"""Restarts of one child allowed within RESTART_WINDOW_SECONDS before `up` gives up."""
RESTART_WINDOW_SECONDS = 60.0


def run_up(flower: bool = False, flower_port: int = 5555, flower_basic_auth: str | None = None) -> int:
    from creditworker.storage.database import make_engine
    from creditworker.storage.migrate import upgrade
    from creditworker.worker.app import result_backend_url

    settings = get_settings()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    programs = {
        "worker": commands.WORKER,
        "beat": commands.beat_command(str(data_dir / "celerybeat-schedule")),
    }
    if flower:
        programs["flower"] = commands.flower_command(flower_port, flower_basic_auth)
    print(f"creditworker up: database {engine.url.render_as_string()}", flush=True)
    print(f"  broker {settings.broker_url}, results {result_backend_url(settings)}", flush=True)
    if flower:
        print(f"  flower http://127.0.0.1:{flower_port}/", flush=True)
    print("  Ctrl-C stops everything", flush=True)

    children = {
        name: subprocess.Popen(argv, start_new_session=True) for name, argv in programs.items()
    }
    restarts: dict[str, list[float]] = {name: [] for name in programs}
    stopping = False

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    exit_code = 0
    while not stopping:
        for name, child in list(children.items()):
            code = child.poll()
            if code is None or stopping:
                continue
            now = time.monotonic()
            recent = [t for t in restarts[name] if now - t < RESTART_WINDOW_SECONDS]
            if len(recent) >= MAX_RESTARTS:
                print(f"creditworker up: {name} exited with {code} {len(recent) + 1} times within "
                      f"{RESTART_WINDOW_SECONDS:.0f} s; stopping", file=sys.stderr, flush=True)
                exit_code = code or 1
                stopping = True
                continue
            restarts[name] = [*recent, now]
            print(f"creditworker up: {name} exited with {code}; restarting it", file=sys.stderr, flush=True)
            children[name] = subprocess.Popen(programs[name], start_new_session=True)
        time.sleep(0.2)
    _stop_all(children)
    return exit_code


def _stop_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for child in children.values():
        if child.poll() is None:
            # The main process only: Celery's warm shutdown stops its own pool after the
            # running tasks finish; a signal to the whole group would kill them mid-task.
            os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
