"""`creditworker alerts threshold USER (--amount N | --percent P | --default)`: an account's
low-credit threshold, absolute or as a percentage of its last grant (docs/webhooks.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from creditworker.cli.context import current
from creditworker.cli.output import reports_errors

commands = typer.Typer(help="Balance alerts: low, depleted and recovered.", no_args_is_help=True)


@commands.command("threshold")
@reports_errors
def alerts_threshold(
    user_id: Annotated[str, typer.Argument(help="The account.")],
    amount: Annotated[int | None, typer.Option(min=0, help="An absolute threshold in credits.")] = None,
    percent: Annotated[int | None, typer.Option(min=1, max=100, help="A percentage of the last grant.")] = None,
    default: Annotated[bool, typer.Option("--default", help="Back to the service default.")] = False,
) -> None:
    """Set the low-credit threshold: `credits.low` at or below it, `credits.recovered` back above."""
    from creditworker.contract.errors import ValidationFailed

    if sum((amount is not None, percent is not None, default)) != 1:
        raise ValidationFailed("give exactly one of --amount, --percent or --default")
    credits = current().credit_service()
    if percent is not None:
        threshold = credits.set_low_credit_threshold(user_id, percent=percent).threshold
        shown = str(threshold) if threshold else "none until the first grant"
        print(f"{user_id}: {percent}% of the last grant, now {shown}")
        return
    credits.set_low_credit_threshold(user_id, amount)
    print(f"{user_id}: {amount if amount is not None else 'the service default'}")
