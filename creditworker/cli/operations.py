"""Commands that run an operation of the registry (creditworker/contract/operations.py).

Such a command is declared with `runs`, under the name the registry gives it, and calls the
engine method the registry names through `run`. Its parameters are the request model's
fields as a person types them; tests/worker/test_operations.py fails when the two disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import typer

from creditworker.cli.context import current
from creditworker.cli.output import reports_errors
from creditworker.contract.errors import ValidationFailed
from creditworker.contract.operations import Operation

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class OperationCommand:
    """A command that runs a registry operation, and how its parameters map to the request's
    fields: `renamed` where the command line says it otherwise (`--period` is
    `billing_period`), `cli_only` for parameters no request has, `left_out` for request
    fields the command does not offer."""

    operation: Operation
    function: Callable[..., Any]
    renamed: Mapping[str, str]
    cli_only: frozenset[str]
    left_out: frozenset[str]


OPERATION_COMMANDS: dict[str, OperationCommand] = {}
"""By the registry's `cli` name (`"plans create"`)."""


def runs(
    operation: Operation,
    group: typer.Typer,
    *,
    renamed: Mapping[str, str] | None = None,
    cli_only: tuple[str, ...] = (),
    left_out: tuple[str, ...] = (),
    negative_numbers: bool = False,
) -> Callable[[F], F]:
    """Register a command on `group` under the name the registry gives `operation` (its last
    word; the group is the words before it); `negative_numbers` lets `-5` through to the
    command, which refuses it with the engine's clear error."""
    assert operation.cli is not None, f"{operation.task} has no CLI command in the registry"
    name = operation.cli.split()[-1]
    settings = {"ignore_unknown_options": True} if negative_numbers else None

    def register(function: F) -> F:
        OPERATION_COMMANDS[operation.cli] = OperationCommand(  # type: ignore[index]
            operation, function, renamed or {}, frozenset(cli_only), frozenset(left_out))
        group.command(name, context_settings=settings)(reports_errors(function))
        return function

    return register


def run(operation: Operation, given: dict[str, Any], *, cleared: Collection[str] = (), **fields: Any) -> Any:
    """The engine method the registry names, called with a command's arguments (its
    `locals()`) as the request's fields, `fields` (parsed here: amounts, plan references)
    over them; an option left unset is left to the engine's default, as on the wire, and the
    fields named in `cleared` are sent as null (a request that clears them, as the API can)."""
    assert operation.engine is not None and operation.cli is not None
    command = OPERATION_COMMANDS[operation.cli]
    arguments = {command.renamed.get(name, name): value for name, value in given.items()
                 if name != "as_json" and name not in command.cli_only}
    arguments.update(fields)
    given_fields = {name: value for name, value in arguments.items() if value is not None}
    given_fields.update(dict.fromkeys(cleared))
    from creditworker.engine.handlers import engine_method  # the engine loads on first use

    return engine_method(current(), operation)(**given_fields)


def parse_amount(amount: str) -> int:
    """Amounts are parsed here, not by click, so `-5` and `1.5` get the engine's clear error."""
    try:
        return int(amount, 10)
    except ValueError:
        raise ValidationFailed(
            f"amount must be a whole number of credits, got {amount!r}"
        ) from None


def plan_ref(plan: str) -> int | str:
    """A plan by id (digits) or by name."""
    return int(plan) if plan.isdigit() else plan
