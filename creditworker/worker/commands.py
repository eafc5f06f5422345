"""The command lines that run creditworker: the e2e tests, `creditworker up` and
docker-compose all start exactly these, so what is tested is what is deployed."""

from __future__ import annotations

WORKER: list[str] = [
    "celery", "-A", "creditworker", "worker",
    "--loglevel=INFO", "--pool=prefork", "--concurrency=2",
]
"""Task events follow `CREDITWORKER_TASK_EVENTS` (off by default; Flower switches them on)."""
BEAT: list[str] = ["celery", "-A", "creditworker", "beat", "--loglevel=INFO"]
MIGRATE: list[str] = ["creditworker", "db", "upgrade"]


def flower_command(port: int = 5555, basic_auth: str | None = None, address: str | None = None) -> list[str]:
    """Flower on `port`; with `basic_auth` ("user:password") every page and API call needs it.

    `address` None listens on every interface (what a container needs behind its port
    mapping); `creditworker up` passes 127.0.0.1 unless told otherwise.
    """
    command = ["celery", "-A", "creditworker", "flower", f"--port={port}"]
    if address is not None:
        command.append(f"--address={address}")
    if basic_auth:
        command.append(f"--basic-auth={basic_auth}")
    return command


def serve_command(host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """The HTTP gateway (the `http` extra)."""
    return ["creditworker", "serve", f"--host={host}", f"--port={port}"]


def beat_command(schedule_file: str) -> list[str]:
    """Beat keeps its last-run times in `schedule_file`."""
    return [*BEAT, f"--schedule={schedule_file}"]
