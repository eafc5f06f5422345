"""`creditworker audit`: check the ledger invariants on the live database.

The audit (SQLAlchemy) is imported inside the command, so that the other commands start
without it.
"""

from __future__ import annotations

import typer

from creditworker.cli.context import current
from creditworker.cli.output import JsonOption, console, print_json, reports_errors, table
from creditworker.contract.credits import OveragePolicy

commands = typer.Typer()


@commands.command("audit")
@reports_errors
def audit_command(as_json: JsonOption = False) -> None:
    """Check the ledger invariants on the live database; exit 1 naming the accounts if any fail."""
    from creditworker.records.audit import audit

    context = current()
    allow_negative = context.settings.overage_policy is OveragePolicy.ALLOW_NEGATIVE
    report = audit(context.ready_engine(), allow_negative=allow_negative)
    if as_json:
        print_json({
            "passed": report.passed,
            "accounts_checked": report.accounts_checked,
            "problems": [problem.__dict__ for problem in report.problems],
        })
    elif report.passed:
        console.print(f"audit passed: {report.accounts_checked} accounts checked")
    else:
        shown = table(f"audit failed: {len(report.problems)} problems", ("check", "user", "detail"))
        for problem in report.problems:
            shown.add_row(problem.check, problem.user_id or "-", problem.detail)
        console.print(shown)
    if not report.passed:
        raise typer.Exit(1)
