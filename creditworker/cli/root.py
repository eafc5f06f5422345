"""The `creditworker` command: admin commands over the engine, schema tools and the runner.

Each command reads its input, calls the engine (or the worker launcher) and prints: rich
tables for people, `--json` for scripts. A refused operation prints
`error: <code>: <message>` and exits 2.

A command that runs an operation of the registry (`creditworker/contract/operations.py`) is
registered by `_runs`, under the name the registry gives it, and calls the engine method the
registry names (`_run`). Its parameters are the request model's fields as a person types
them; tests/worker/test_operations.py fails when the two disagree.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from creditworker.cli.schema import schema
from creditworker.contract.errors import CreditError
from creditworker.contract.operations import (
    ADD,
    ALLOCATE_DUE,
    ASSIGN_PLAN,
    BALANCE,
    CHANGE_PLAN,
    CREATE_PLAN,
    DEDUCT,
    DELETE_PLAN,
    GET_SUBSCRIPTION,
    HISTORY,
    LIST_PLANS,
    REMOVE_PLAN,
    UPDATE_PLAN,
    Operation,
)

app = typer.Typer(help="Credit and subscription management.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
events_app = typer.Typer(help="Notification events.", no_args_is_help=True)
app.add_typer(db_app, name="db")
plans_app = typer.Typer(help="Subscription plans and the users on them.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(plans_app, name="plans")

console = Console()
F = TypeVar("F", bound=Callable[..., Any])

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


class _Options:
    database_url: str | None = None


@app.callback()
def _global(
    database_url: Annotated[
        Optional[str],
        typer.Option("--database-url", envvar="CREDITWORKER_DATABASE_URL", help="SQLAlchemy database URL."),
    ] = None,
) -> None:
    _Options.database_url = database_url


def _database_url() -> str:
    from creditworker.settings import get_settings

    return _Options.database_url or get_settings().database_url


def _service() -> Any:
    from creditworker.engine import CreditService
    from creditworker.settings import get_settings
    from creditworker.storage.readiness import ready_engine

    return CreditService.from_settings(get_settings(), database=ready_engine(_database_url()))


def _reports_errors(command: F) -> F:
    """Turn a CreditError into `error: code: message` (or JSON) and exit status 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CreditError as exc:
            if kwargs.get("as_json"):
                print(json.dumps({"error": exc.to_dict()}, default=str), file=sys.stderr)
            else:
                print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in value]
    print(json.dumps(value, default=str))


def _entry_table(entries: list[Any], title: str) -> Table:
    table = Table(title=title)
    for column in ("id", "kind", "amount", "held", "balance", "available", "key", "time"):
        table.add_column(column, justify="right" if column in ("id", "amount", "held", "balance", "available") else "left")
    for entry in entries:
        table.add_row(
            str(entry.id), entry.kind.value, str(entry.amount), str(entry.held),
            str(entry.balance_after), str(entry.available_after), entry.idempotency_key,
            entry.created_at.isoformat(timespec="seconds"),
        )
    return table


# ---------------------------------------------------------------------------- operations


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

_GROUPS = {(): app, ("plans",): plans_app}


def _runs(
    operation: Operation,
    *,
    renamed: Mapping[str, str] | None = None,
    cli_only: tuple[str, ...] = (),
    left_out: tuple[str, ...] = (),
    negative_numbers: bool = False,
) -> Callable[[F], F]:
    """Register a command under the name the registry gives `operation`; `negative_numbers`
    lets `-5` through to the command, which refuses it with the engine's clear error."""
    assert operation.cli is not None, f"{operation.task} has no CLI command in the registry"
    *group, name = operation.cli.split()
    settings = {"ignore_unknown_options": True} if negative_numbers else None

    def register(function: F) -> F:
        OPERATION_COMMANDS[operation.cli] = OperationCommand(  # type: ignore[index]
            operation, function, renamed or {}, frozenset(cli_only), frozenset(left_out))
        _GROUPS[tuple(group)].command(name, context_settings=settings)(_reports_errors(function))
        return function

    return register


def _run(operation: Operation, given: dict[str, Any], **fields: Any) -> Any:
    """The engine method the registry names, called with a command's arguments (its
    `locals()`) as the request's fields, `fields` (parsed here: amounts, plan references)
    over them; an option left unset is left to the engine's default, as on the wire."""
    assert operation.engine is not None and operation.cli is not None
    command = OPERATION_COMMANDS[operation.cli]
    arguments = {command.renamed.get(name, name): value for name, value in given.items()
                 if name != "as_json" and name not in command.cli_only}
    arguments.update(fields)
    owner, method = operation.engine.split(".")
    engine = _service() if owner == "credits" else _subscriptions()
    return getattr(engine, method)(**{name: value for name, value in arguments.items() if value is not None})


# ---------------------------------------------------------------------------- db


def _unreachable(exc: Exception) -> typer.Exit:
    """A database error as one line on stderr, and exit status 2."""
    from sqlalchemy.engine import make_url

    from creditworker.storage.readiness import connection_problem

    print(f"error: database_not_ready: {connection_problem(make_url(_database_url()), exc)}", file=sys.stderr)  # type: ignore[arg-type]
    return typer.Exit(2)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration to the configured database."""
    from sqlalchemy.exc import DBAPIError

    from creditworker.storage.database import make_engine
    from creditworker.storage.migrate import current_revision, upgrade

    engine = make_engine(_database_url())
    try:
        upgrade(engine)
    except DBAPIError as exc:
        raise _unreachable(exc) from None
    console.print(f"database at revision {current_revision(engine)}: {engine.url.render_as_string()}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's migration revision."""
    from sqlalchemy.exc import DBAPIError

    from creditworker.storage.database import make_engine
    from creditworker.storage.migrate import current_revision

    try:
        print(current_revision(make_engine(_database_url())) or "none")
    except DBAPIError as exc:
        raise _unreachable(exc) from None


# ---------------------------------------------------------------------------- schema and audit


app.command()(schema)


@app.command("audit")
@_reports_errors
def audit_command(as_json: JsonOption = False) -> None:
    """Check the ledger invariants on the live database; exit 1 naming the accounts if any fail."""
    from creditworker.contract.credits import OveragePolicy
    from creditworker.records.audit import audit
    from creditworker.settings import get_settings
    from creditworker.storage.readiness import ready_engine

    allow_negative = get_settings().overage_policy is OveragePolicy.ALLOW_NEGATIVE
    report = audit(ready_engine(_database_url()), allow_negative=allow_negative)
    if as_json:
        _print_json(
            {
                "passed": report.passed,
                "accounts_checked": report.accounts_checked,
                "problems": [problem.__dict__ for problem in report.problems],
            }
        )
    elif report.passed:
        console.print(f"audit passed: {report.accounts_checked} accounts checked")
    else:
        table = Table(title=f"audit failed: {len(report.problems)} problems")
        for column in ("check", "user", "detail"):
            table.add_column(column)
        for problem in report.problems:
            table.add_row(problem.check, problem.user_id or "-", problem.detail)
        console.print(table)
    if not report.passed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- credits


@_runs(BALANCE)
def balance(user_id: str, as_json: JsonOption = False) -> None:
    """Show a user's total, reserved, available and soon-expiring credits."""
    info = _run(BALANCE, locals())
    if as_json:
        _print_json(info)
        return
    table = Table(title=f"credits of {user_id}")
    for column in ("total", "reserved", "available", f"expiring in {info.expiring_within_days} days"):
        table.add_column(column, justify="right")
    table.add_row(str(info.total), str(info.reserved), str(info.available), str(info.expiring_soon))
    console.print(table)


@_runs(HISTORY, renamed={"kind": "kinds"})
def history(
    user_id: str,
    limit: Annotated[int, typer.Option(help="Entries per page.")] = 50,
    before: Annotated[Optional[int], typer.Option(help="Show entries older than this entry id.")] = None,
    kind: Annotated[Optional[list[str]], typer.Option(help="Only these kinds (repeatable).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a user's ledger entries, newest first."""
    entries = _run(HISTORY, locals())
    _print_json(entries) if as_json else console.print(_entry_table(entries, f"history of {user_id}"))


@app.command()
@_reports_errors
def ledger(
    kind: Annotated[Optional[str], typer.Option(help="error (refused operations) or system (sweep runs); both by default.")] = None,
    user: Annotated[Optional[str], typer.Option(help="Only this user's records.")] = None,
    limit: Annotated[int, typer.Option(help="Records per page.")] = 50,
    before: Annotated[Optional[int], typer.Option(help="Show records older than this record id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the ledger's other records, newest first: refused operations and sweep runs."""
    from creditworker.contract.errors import ValidationFailed

    if kind not in (None, "error", "system"):
        raise ValidationFailed(f"kind must be error or system, got {kind!r}")
    records = _service().get_ledger_records(kind=kind, user_id=user, limit=limit, before=before)
    if as_json:
        _print_json(records)
        return
    table = Table(title="ledger records")
    for column in ("id", "kind", "operation", "user", "code", "what", "time"):
        table.add_column(column, justify="right" if column == "id" else "left")
    for record in records:
        what = record.message if record.kind == "error" else ", ".join(
            f"{name} {count}" for name, count in record.details.items())
        table.add_row(str(record.id), record.kind.value, record.operation, record.user_id or "-",
                      record.code or "-", what or "", record.created_at.isoformat(timespec="seconds"))
    console.print(table)


def _parse_amount(amount: str) -> int:
    """Amounts are parsed here, not by click, so `-5` and `1.5` get the engine's clear error."""
    try:
        return int(amount, 10)
    except ValueError:
        from creditworker.contract.errors import ValidationFailed

        raise ValidationFailed(f"amount must be a whole number of credits, got {amount!r}") from None


KeyOption = Annotated[
    Optional[str], typer.Option(help="Repeat the command with the same key: applied once.")
]
NOT_ON_THE_COMMAND_LINE = ("metadata",)
"""A JSON object: for producers and the gateway."""


@_runs(ADD, left_out=NOT_ON_THE_COMMAND_LINE, negative_numbers=True)
def add(
    user_id: str,
    amount: str,
    expires_at: Annotated[Optional[datetime], typer.Option(help="ISO time the lot expires (UTC if no zone).")] = None,
    priority: Annotated[Optional[int], typer.Option(help="Draw-down priority, lower first.")] = None,
    source: Annotated[str, typer.Option(help="purchase, bonus, subscription or adjustment.")] = "purchase",
    description: Annotated[Optional[str], typer.Option()] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Grant credits to a user."""
    entry = _run(ADD, locals(), amount=_parse_amount(amount))
    _print_json(entry) if as_json else console.print(_entry_table([entry], f"added {entry.amount} to {user_id}"))


@_runs(DEDUCT, left_out=NOT_ON_THE_COMMAND_LINE, negative_numbers=True)
def deduct(
    user_id: str,
    amount: str,
    description: Annotated[Optional[str], typer.Option()] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Consume credits now."""
    entry = _run(DEDUCT, locals(), amount=_parse_amount(amount))
    _print_json(entry) if as_json else console.print(_entry_table([entry], f"deducted {-entry.amount} from {user_id}"))


# ---------------------------------------------------------------------------- plans


def _subscriptions() -> Any:
    from creditworker.engine import SubscriptionService

    return SubscriptionService(_service())


def _plan_ref(plan: str) -> int | str:
    """A plan by id (digits) or by name."""
    return int(plan) if plan.isdigit() else plan


def _plans_table(plans: list[Any], title: str) -> Table:
    table = Table(title=title)
    for column in ("id", "name", "credits", "period", "validity", "price", "active"):
        table.add_column(column)
    for plan in plans:
        table.add_row(
            str(plan.id), plan.name, str(plan.credit_limit), plan.billing_period.value,
            f"{plan.validity_days} days" if plan.validity_days else "period",
            f"{plan.price} {plan.currency}", "yes" if plan.active else "no",
        )
    return table


def _show_subscription(subscription: Any, as_json: bool) -> None:
    if as_json:
        _print_json(subscription)
        return
    pending = f", then plan {subscription.pending_plan_id}" if subscription.pending_plan_id else ""
    ending = ", ends at period end" if subscription.cancel_at_period_end else ""
    console.print(
        f"{subscription.user_id}: plan {subscription.plan_id}, {subscription.status}, period "
        f"{subscription.period_index} {subscription.current_period_start:%Y-%m-%d %H:%M} - "
        f"{subscription.current_period_end:%Y-%m-%d %H:%M} UTC{pending}{ending}"
    )


@_runs(CREATE_PLAN, renamed={"period": "billing_period"}, negative_numbers=True)
def plans_create(
    name: str,
    credit_limit: str,
    price: Annotated[str, typer.Option(help="Price per period, a decimal.")] = "0",
    currency: Annotated[str, typer.Option(help="ISO 4217 code.")] = "USD",
    period: Annotated[str, typer.Option(help="daily, monthly or yearly.")] = "monthly",
    validity_days: Annotated[Optional[int], typer.Option(help="Days each grant stays valid (default: the period).")] = None,
    active: Annotated[bool, typer.Option("--active/--inactive", help="Whether users can be put on it.")] = True,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a plan granting CREDIT_LIMIT credits each period."""
    plan = _run(CREATE_PLAN, locals(), credit_limit=_parse_amount(credit_limit))
    _print_json(plan) if as_json else console.print(_plans_table([plan], "created"))


@_runs(UPDATE_PLAN)
def plans_update(
    plan: str,
    name: Annotated[Optional[str], typer.Option()] = None,
    credit_limit: Annotated[Optional[str], typer.Option(help="Credits per period, from the next period.")] = None,
    price: Annotated[Optional[str], typer.Option()] = None,
    currency: Annotated[Optional[str], typer.Option()] = None,
    validity_days: Annotated[Optional[int], typer.Option()] = None,
    active: Annotated[Optional[bool], typer.Option("--active/--inactive")] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a plan (by id or name): only the options given."""
    updated = _run(UPDATE_PLAN, locals(), plan=_plan_ref(plan),
                   credit_limit=_parse_amount(credit_limit) if credit_limit else None)
    _print_json(updated) if as_json else console.print(_plans_table([updated], "updated"))


@_runs(DELETE_PLAN)
def plans_delete(plan: str, idempotency_key: KeyOption = None, as_json: JsonOption = False) -> None:
    """Delete an unused plan; a plan users are on is deactivated instead (exit status 2)."""
    _subscriptions().delete_plan(_plan_ref(plan), idempotency_key=idempotency_key)
    _print_json({"deleted": plan}) if as_json else console.print(f"deleted plan {plan}")


@_runs(LIST_PLANS)
def plans_list(
    include_inactive: Annotated[bool, typer.Option("--all", help="Include inactive plans.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List plans."""
    plans = _run(LIST_PLANS, locals())
    _print_json(plans) if as_json else console.print(_plans_table(plans, "plans"))


@_runs(ASSIGN_PLAN)
def plans_assign(
    user_id: str,
    plan: str,
    start_at: Annotated[Optional[datetime], typer.Option(help="When the first period started (UTC if no zone).")] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Put a user on a plan and grant the first period's credits now."""
    _show_subscription(_run(ASSIGN_PLAN, locals(), plan=_plan_ref(plan)), as_json)


@_runs(CHANGE_PLAN)
def plans_change(user_id: str, plan: str, idempotency_key: KeyOption = None, as_json: JsonOption = False) -> None:
    """Upgrade now (prorated grant) or downgrade at the next period."""
    _show_subscription(_run(CHANGE_PLAN, locals(), plan=_plan_ref(plan)), as_json)


@_runs(REMOVE_PLAN, renamed={"now": "at_period_end"})
def plans_remove(
    user_id: str,
    now: Annotated[bool, typer.Option("--now", help="End now instead of at the end of the period.")] = False,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Take a user off their plan (at the end of the period unless --now)."""
    _show_subscription(_run(REMOVE_PLAN, locals(), at_period_end=not now), as_json)


@_runs(GET_SUBSCRIPTION)
def plans_subscription(user_id: str, as_json: JsonOption = False) -> None:
    """Show a user's active subscription."""
    _show_subscription(_run(GET_SUBSCRIPTION, locals()), as_json)


@_runs(ALLOCATE_DUE, cli_only=("backfill",))
def plans_allocate(
    backfill: Annotated[bool, typer.Option(help="Also grant missed periods still valid.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Grant every due subscription its period now (beat sends this out to the workers)."""
    granted = _subscriptions().allocate_due(backfill=backfill)
    _print_json({"granted": granted}) if as_json else console.print(f"granted {granted} periods")


# ---------------------------------------------------------------------------- running


@app.command()
def up(
    flower: Annotated[bool, typer.Option("--flower", help="Also run Flower (optional: if it cannot start, the rest runs on).")] = False,
    flower_port: Annotated[int, typer.Option(help="Flower's port.")] = 5555,
    flower_address: Annotated[
        str, typer.Option(help="Address Flower listens on; 0.0.0.0 for every interface.")
    ] = "127.0.0.1",
    flower_basic_auth: Annotated[
        str | None,
        typer.Option(
            envvar="FLOWER_BASIC_AUTH",
            help="user:password for Flower's pages and API; default: a password made up and printed at start.",
        ),
    ] = None,
) -> None:
    """Migrate the database, then run worker and beat (and Flower) until Ctrl-C."""
    from creditworker.settings import get_settings
    from creditworker.worker.launcher import FlowerOptions, run_up

    if flower_basic_auth and not all(":" in pair for pair in flower_basic_auth.split(",")):
        raise typer.BadParameter("expected user:password", param_hint="--flower-basic-auth")
    options = FlowerOptions(flower_port, flower_address, flower_basic_auth) if flower else None
    raise typer.Exit(run_up(get_settings(), options))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run the HTTP gateway (needs the http extra: pip install 'creditworker\\[http]')."""
    try:
        from creditworker.http.serve import serve as run_gateway
    except ImportError as exc:
        print(f"error: the HTTP gateway needs the http extra ({exc.name} is missing)", file=sys.stderr)
        raise typer.Exit(2) from None
    run_gateway(host, port)


@events_app.command("tail")
def events_tail(
    key: Annotated[str, typer.Option("--key", help="Routing-key pattern, e.g. 'credits.*'.")] = "#",
    timeout: Annotated[
        Optional[float], typer.Option(help="Stop after this many seconds without an event.")
    ] = None,
) -> None:
    """Print events as JSON lines as they are published (from a private, temporary queue)."""
    from creditworker.notifications.exchange import tail

    for payload in tail(key, timeout=timeout):
        print(json.dumps(payload), flush=True)


# ---------------------------------------------------------------------------- dead letters

dead_letters_app = typer.Typer(
    help="Messages a worker could not read, kept instead of stopping it.", no_args_is_help=True
)
app.add_typer(dead_letters_app, name="dead-letters")


def _dead_letters() -> Any:
    from creditworker.records.dead_letters import DeadLetterStore
    from creditworker.storage.readiness import ready_engine

    return DeadLetterStore(ready_engine(_database_url()))


@dead_letters_app.command("list")
@_reports_errors
def dead_letters_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 50,
    before_id: Annotated[Optional[int], typer.Option(help="Only letters older than this id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List dead letters, newest first: id, time, task, task id and why."""
    letters = _dead_letters().newest(limit=limit, before_id=before_id)
    if as_json:
        print(json.dumps([letter.as_dict() for letter in letters]))
        return
    table = Table(title=f"dead letters ({len(letters)} shown)")
    for column in ("id", "received", "task", "task id", "queue", "bytes", "reason"):
        table.add_column(column, justify="right" if column in ("id", "bytes") else "left")
    for letter in letters:
        table.add_row(
            str(letter.id), letter.received_at.isoformat(timespec="seconds"), letter.task_name or "",
            letter.task_id or "", letter.queue or "", str(letter.body_size), letter.reason,
        )
    console.print(table)


@dead_letters_app.command("show")
@_reports_errors
def dead_letters_show(letter_id: Annotated[int, typer.Argument(help="The letter's id.")]) -> None:
    """Print one dead letter whole, as JSON: headers, properties and body as they arrived."""
    letter = _dead_letters().get(letter_id)
    if letter is None:
        print(f"error: not_found: no dead letter {letter_id}", file=sys.stderr)
        raise typer.Exit(2)
    print(json.dumps(letter.as_dict(), indent=2))


@dead_letters_app.command("purge")
@_reports_errors
def dead_letters_purge(
    letter_ids: Annotated[Optional[list[int]], typer.Argument(help="Ids to delete (default: all).")] = None,
    before: Annotated[
        Optional[datetime], typer.Option(help="Only letters received before this time (UTC).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Delete dead letters: the ids given, those received before a time, or all."""
    from datetime import timezone

    if not (letter_ids or before or yes):
        typer.confirm("Delete every dead letter?", abort=True)
    if before is not None and before.tzinfo is None:
        before = before.replace(tzinfo=timezone.utc)
    deleted = _dead_letters().purge(ids=letter_ids or None, before=before)
    print(f"deleted {deleted} dead letter{'s' if deleted != 1 else ''}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
