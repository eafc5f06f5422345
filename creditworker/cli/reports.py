"""`creditworker usage`: credits granted, consumed, expired, voided and refunded per period,
as CSV (what finance asks for), over every account or one."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated

import typer

from creditworker.cli.operations import run, runs
from creditworker.cli.output import JsonOption, print_json
from creditworker.contract.credits import write_usage_csv
from creditworker.contract.operations import USAGE

commands = typer.Typer()

DATES = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]


@runs(USAGE, commands, renamed={"user": "user_id"})
def usage(
    start: Annotated[datetime, typer.Argument(formats=DATES, help="First moment counted (UTC).")],
    end: Annotated[datetime, typer.Argument(formats=DATES, help="First moment not counted.")],
    granularity: Annotated[str, typer.Option(help="day or month.")] = "day",
    user: Annotated[
        str | None, typer.Option(help="One user's usage; every account's without it.")
    ] = None,
    credit_type: Annotated[
        str | None, typer.Option("--credit-type", help="One credit type (default: every type).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print usage per period of [START, END) as CSV (one row per period with entries)."""
    periods = run(USAGE, locals())
    if as_json:
        print_json(periods)
        return
    write_usage_csv(periods, sys.stdout)
