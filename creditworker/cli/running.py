"""`creditworker up | serve`: run the system (worker, beat, Flower) or the HTTP gateway.

The launcher and the gateway are imported inside their commands: they are the heaviest
imports, and the gateway needs the `http` extra. Both read the settings themselves, in the
process they supervise or serve from.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

commands = typer.Typer()


@commands.command()
def up(
    flower: Annotated[
        bool,
        typer.Option("--flower", help="Also run Flower (optional: if it cannot start, the rest "
                     "runs on)."),
    ] = False,
    flower_port: Annotated[int, typer.Option(help="Flower's port.")] = 5555,
    flower_address: Annotated[
        str, typer.Option(help="Address Flower listens on; 0.0.0.0 for every interface.")
    ] = "127.0.0.1",
    flower_basic_auth: Annotated[
        str | None,
        typer.Option(
            envvar="FLOWER_BASIC_AUTH",
            help="user:password for Flower's pages and API; default: a password made up and "
            "printed at start.",
        ),
    ] = None,
) -> None:
    """Migrate the database, then run worker and beat (and Flower) until Ctrl-C."""
    from creditworker.cli.context import current
    from creditworker.worker.launcher import FlowerOptions, run_up

    if flower_basic_auth and not all(":" in pair for pair in flower_basic_auth.split(",")):
        raise typer.BadParameter("expected user:password", param_hint="--flower-basic-auth")
    options = FlowerOptions(flower_port, flower_address, flower_basic_auth) if flower else None
    raise typer.Exit(run_up(current().settings, options))


@commands.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run the HTTP gateway (needs the http extra: pip install 'creditworker[http]')."""
    try:
        from creditworker.http.serve import serve as run_gateway
    except ImportError as exc:
        print(f"error: the HTTP gateway needs the http extra ({exc.name} is missing)",
              file=sys.stderr)
        raise typer.Exit(2) from None
    from creditworker.cli.context import current
    from creditworker.contract.errors import DatabaseNotReady
    from creditworker.storage.drivers import resolve_database_url
    from creditworker.worker.startup import database_problem

    resolve_database_url(current().database_url)  # no URL at all: the bad_database_url line
    problem, fatal = database_problem(current().database_url)
    if fatal:
        raise DatabaseNotReady(str(problem))  # one line (setup_errors.py)
    if problem is not None:  # reads answer 503 until it does; writes go to the workers
        print(f"creditworker serve: warning: {problem}", file=sys.stderr, flush=True)
    run_gateway(host, port)
