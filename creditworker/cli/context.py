"""What every command is handed: the options of the `creditworker` callback and the
settings, read once per run, and the engine objects built from them.

The callback (app.py) makes one `CommandContext` per run with `begin()`; a command asks for
it with `current()`. (Not through click's context object: Typer 0.29 runs its own copy of
click, so `click.get_current_context()` does not see Typer's; a context variable works with
every version.) Settings are read on first use, not in the callback, so that `schema`
and `--help` work in an environment whose settings do not validate. The settings, engine and
storage modules are imported inside the methods below: importing the last two at the top would
load SQLAlchemy for every command, `--help` included (tests/cli/test_startup.py).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from creditworker.engine import CreditService, SubscriptionService
    from creditworker.records.dead_letters import DeadLetterStore
    from creditworker.settings import Settings


@dataclass
class CommandContext:
    database_url_option: str | None = None
    """`--database-url` (or CREDITWORKER_DATABASE_URL, which click reads for it)."""

    @cached_property
    def settings(self) -> Settings:
        from creditworker.settings import get_settings

        return get_settings()

    @property
    def database_url(self) -> str:
        return self.database_url_option or self.settings.database_url

    def ready_engine(self) -> Engine:
        """An engine on a database that answers and is migrated, or a clear CreditError."""
        from creditworker.storage.readiness import ready_engine

        return ready_engine(self.database_url)

    def credit_service(self) -> CreditService:
        from creditworker.engine import CreditService

        return CreditService.from_settings(self.settings, database=self.ready_engine())

    def subscription_service(self) -> SubscriptionService:
        from creditworker.engine import SubscriptionService

        return SubscriptionService(self.credit_service(),
                                   chunk_size=self.settings.allocation_chunk_size,
                                   backfill=self.settings.allocation_backfill)

    @property
    def credits(self) -> CreditService:
        """`credit_service()` under the name the registry uses (`credits.<method>`)."""
        return self.credit_service()

    @property
    def subscriptions(self) -> SubscriptionService:
        """`subscription_service()` under the name the registry uses."""
        return self.subscription_service()

    def dead_letters(self) -> DeadLetterStore:
        from creditworker.records.dead_letters import DeadLetterStore

        return DeadLetterStore(self.ready_engine())


_RUNNING: ContextVar[CommandContext | None] = ContextVar("creditworker_command", default=None)


def begin(database_url_option: str | None) -> None:
    """Called by the app's callback, before the command: this run's context."""
    _RUNNING.set(CommandContext(database_url_option))


def current() -> CommandContext:
    """The running command's context (a fresh one when a command runs without the app's
    callback, as `python -m creditworker.cli.schema` does)."""
    running = _RUNNING.get()
    return running if running is not None else CommandContext()
