"""`creditworker events tail`: watch the notification events as they are published.

kombu and the exchange are imported inside the command, so that the other commands start
without them.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from creditworker.cli.context import current

commands = typer.Typer(help="Notification events.", no_args_is_help=True)


@commands.command("tail")
def events_tail(
    key: Annotated[str, typer.Option("--key", help="Routing-key pattern, e.g. 'credits.*'.")] = "#",
    timeout: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without an event.")
    ] = None,
) -> None:
    """Print events as JSON lines as they are published (from a private, temporary queue)."""
    from creditworker.notifications.exchange import tail
    from creditworker.settings import broker_transport_options

    settings = current().settings
    events = tail(key, timeout=timeout, broker_url=settings.broker_url,
                  transport_options=broker_transport_options(settings))
    for payload in events:
        print(json.dumps(payload), flush=True)
