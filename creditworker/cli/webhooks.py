"""`creditworker webhooks add | list | update | disable | enable | rotate-secret | remove |
deliveries | show | replay`: signed webhook endpoints and their delivery log (docs/webhooks.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from creditworker.cli.context import current
from creditworker.cli.output import JsonOption, console, print_json, reports_errors, table

EndpointId = Annotated[int, typer.Argument(help="The endpoint's id.")]

if TYPE_CHECKING:
    from creditworker.notifications.webhooks.service import WebhookService

commands = typer.Typer(help="Signed webhooks: endpoints, deliveries, replays.", no_args_is_help=True)

EventsOption = Annotated[
    str | None,
    typer.Option("--events", help="Event patterns, comma-separated, as on the exchange (credits.*,"
                                  " subscription.renewed, #). Default: every event."),
]


def _service() -> WebhookService:
    from creditworker.notifications.webhooks.service import WebhookOptions, WebhookService

    context = current()
    return WebhookService(context.ready_engine(), WebhookOptions.from_settings(context.settings))


def _patterns(events: str | None) -> list[str] | None:
    return None if events is None else [pattern for pattern in events.split(",") if pattern.strip()]


@commands.command("add")
@reports_errors
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Where to post events (http or https).")],
    events: EventsOption = None,
    description: Annotated[str | None, typer.Option(help="What the endpoint is for.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Register an endpoint; prints its id and signing secret (shown only now)."""
    from creditworker.contract.webhooks import CreateWebhookEndpoint

    endpoint = _service().register(CreateWebhookEndpoint(url=url, events=_patterns(events), description=description))
    if as_json:
        print_json(endpoint)
        return
    print(f"id: {endpoint.id}")
    print(f"secret: {endpoint.secret}")
    print(f"events: {','.join(endpoint.events)}")


@commands.command("list")
@reports_errors
def webhooks_list(as_json: JsonOption = False) -> None:
    """List endpoints: id, URL, events, enabled (or why not)."""
    endpoints = _service().endpoints()
    if as_json:
        print_json(endpoints)
        return
    shown = table(f"webhook endpoints ({len(endpoints)})", ("id", "url", "events", "enabled", "description"),
                  right=("id",))
    for endpoint in endpoints:
        state = "yes" if endpoint.enabled else f"no: {endpoint.disabled_reason or ''}"
        shown.add_row(str(endpoint.id), endpoint.url, ",".join(endpoint.events), state, endpoint.description or "")
    console.print(shown)


@commands.command("update")
@reports_errors
def webhooks_update(
    endpoint_id: EndpointId,
    url: Annotated[str | None, typer.Option(help="A new URL.")] = None,
    events: EventsOption = None,
    description: Annotated[str | None, typer.Option(help="A new description.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Change an endpoint's URL, events or description."""
    from creditworker.contract.webhooks import UpdateWebhookEndpoint

    fields = {"url": url, "events": _patterns(events), "description": description}
    endpoint = _service().update(endpoint_id, UpdateWebhookEndpoint(**{k: v for k, v in fields.items() if v is not None}))
    print_json(endpoint) if as_json else print(f"updated {endpoint.id}")


@commands.command("disable")
@reports_errors
def webhooks_disable(endpoint_id: EndpointId) -> None:
    """Stop sending to an endpoint (its deliveries wait until it is enabled again)."""
    _service().disable(endpoint_id)
    print(f"disabled {endpoint_id}")


@commands.command("enable")
@reports_errors
def webhooks_enable(endpoint_id: EndpointId) -> None:
    """Send to an endpoint again (after a 410, a failing run or `disable`)."""
    from creditworker.contract.webhooks import UpdateWebhookEndpoint

    _service().update(endpoint_id, UpdateWebhookEndpoint(enabled=True))
    print(f"enabled {endpoint_id}")


@commands.command("rotate-secret")
@reports_errors
def webhooks_rotate(endpoint_id: EndpointId) -> None:
    """A new signing secret; the old one also signs until the grace period ends."""
    endpoint = _service().rotate_secret(endpoint_id)
    print(f"secret: {endpoint.secret}")
    if endpoint.rotating_until is not None:
        print(f"the previous secret also signs until {endpoint.rotating_until.isoformat(timespec='seconds')}")


@commands.command("remove")
@reports_errors
def webhooks_remove(endpoint_id: EndpointId) -> None:
    """Delete an endpoint with its deliveries and their log."""
    _service().remove(endpoint_id)
    print(f"removed {endpoint_id}")


@commands.command("deliveries")
@reports_errors
def webhooks_deliveries(
    endpoint_id: EndpointId,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """An endpoint's delivery log, newest first: status, last response code, attempts."""
    deliveries = _service().deliveries(endpoint_id, limit=limit)
    if as_json:
        print_json(deliveries)
        return
    shown = table(f"deliveries of endpoint {endpoint_id} ({len(deliveries)} shown)",
                  ("id", "event", "event id", "status", "code", "attempts", "next attempt", "updated"),
                  right=("id", "code", "attempts"))
    for delivery in deliveries:
        shown.add_row(
            str(delivery.id), delivery.event_type, delivery.event_id, delivery.status,
            str(delivery.last_response_status or ""), str(delivery.attempts),
            delivery.next_attempt_at.isoformat(timespec="seconds") if delivery.next_attempt_at else "",
            delivery.updated_at.isoformat(timespec="seconds"))
    console.print(shown)


@commands.command("show")
@reports_errors
def webhooks_show(delivery_id: Annotated[int, typer.Argument(help="The delivery's id.")]) -> None:
    """One delivery as JSON: its body and every attempt (code, duration, error)."""
    print_json(_service().delivery(delivery_id))


@commands.command("replay")
@reports_errors
def webhooks_replay(delivery_id: Annotated[int, typer.Argument(help="The delivery's id.")]) -> None:
    """Send a delivery again (same webhook-id, fresh retry schedule) at the sender's next run."""
    delivery = _service().replay(delivery_id)
    print(f"replay queued: delivery {delivery.id} (event {delivery.event_id})")
