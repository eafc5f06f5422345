"""The `creditworker` command: one Typer app, one module per command group beside it.

Each command reads its input, calls the engine (or the worker launcher) and prints: rich
tables for people, `--json` for scripts (output.py). A refused operation prints
`error: <code>: <message>` and exits 2. The callback below reads the global options once and
hands them to every command (context.py).

Where a command goes: one that runs an operation of the registry is declared with
`operations.runs` in the module of its group (credits.py, plans.py); any other in the module
of its group, registered here. No module imported here imports SQLAlchemy, so `--help` and
`schema` start fast (tests/cli/test_startup.py).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from creditworker.cli import (
    alerts,
    audit,
    corrections,
    credits,
    db,
    dead_letters,
    events,
    ledger,
    plans,
    reports,
    running,
    topups,
    webhooks,
)
from creditworker.cli.context import begin, current
from creditworker.cli.schema import schema
from creditworker.cli.setup_errors import DEBUG_VARIABLE, debugging, describe

app = typer.Typer(help="Credit and subscription management.", no_args_is_help=True,
                  rich_markup_mode=None, add_completion=False)


@app.callback()
def _global(
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", envvar="CREDITWORKER_DATABASE_URL",
                     help="SQLAlchemy database URL."),
    ] = None,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="CREDITWORKER_DEBUG",
                     help="Show the traceback of a failure, not just its one-line message."),
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"  # the children of `up` and `serve` see it too
    begin(database_url)


# The order of `--help`: running the system first, then one account, then the rest.
for top_level in (running, credits, audit, ledger, reports):
    app.add_typer(top_level.commands)
app.add_typer(db.commands, name="db")
app.add_typer(events.commands, name="events")
app.add_typer(plans.commands, name="plans")
app.add_typer(corrections.commands, name="correct")
app.add_typer(dead_letters.commands, name="dead-letters")
app.add_typer(webhooks.commands, name="webhooks")
app.add_typer(alerts.commands, name="alerts")
app.add_typer(topups.commands, name="topups")
_last = typer.Typer()  # a command of the app itself would be listed before every group's
_last.command()(schema)
app.add_typer(_last)


def main() -> None:
    """The `creditworker` command: a setup failure is one line (setup_errors.py)."""
    try:
        app()
    except Exception as exc:
        line = None if debugging() else describe(exc, _database_url())
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def _database_url() -> str | None:
    try:
        return current().database_url
    except Exception:  # noqa: BLE001 (the settings themselves failed to validate)
        return None


if __name__ == "__main__":
    main()
