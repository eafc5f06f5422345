"""`creditworker alerts threshold USER (--amount N | --percent P | --default) [--credit-type T]`:
an account's low-credit threshold in one credit type, absolute or as a percentage of that
type's last grant (docs/webhooks.md). The registry's `set_low_threshold` operation."""

from __future__ import annotations

from typing import Annotated

import typer

from creditworker.cli.credits import CreditTypeOption
from creditworker.cli.operations import run, runs
from creditworker.cli.output import JsonOption, KeyOption, print_json
from creditworker.contract.credits import DEFAULT_CREDIT_TYPE
from creditworker.contract.errors import ValidationFailed
from creditworker.contract.operations import SET_LOW_THRESHOLD

commands = typer.Typer(help="Balance alerts: low, depleted and recovered.", no_args_is_help=True)


@runs(SET_LOW_THRESHOLD, commands, renamed={"amount": "threshold"}, cli_only=("default",))
def threshold(
    user_id: Annotated[str, typer.Argument(help="The account.")],
    amount: Annotated[int | None, typer.Option(min=0, help="An absolute threshold in credits.")] = None,
    percent: Annotated[int | None, typer.Option(min=1, max=100, help="A percentage of the last grant.")] = None,
    default: Annotated[bool, typer.Option("--default", help="Back to the service default (another "
                                                             "type: no credits.low).")] = False,
    credit_type: CreditTypeOption = DEFAULT_CREDIT_TYPE,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set the low-credit threshold of one credit type: `credits.low` at or below it,
    `credits.recovered` back above; each type has its own."""
    if sum((amount is not None, percent is not None, default)) != 1:
        raise ValidationFailed("give exactly one of --amount, --percent or --default")
    result = run(SET_LOW_THRESHOLD, locals())
    if as_json:
        print_json(result)
        return
    prefix = f"{user_id}" if credit_type == DEFAULT_CREDIT_TYPE else f"{user_id} ({credit_type})"
    if percent is not None:
        shown = str(result.threshold) if result.threshold else "none until the first grant"
        print(f"{prefix}: {percent}% of the last grant, now {shown}")
    elif result.threshold is not None:
        print(f"{prefix}: {result.threshold}")
    else:
        print(f"{prefix}: {'the service default' if credit_type == DEFAULT_CREDIT_TYPE else 'none'}")
