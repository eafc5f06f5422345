"""The registry of operations (creditworker/operations.py) and the edges derived from it or
checked against it: tasks, engine methods, producer methods, gateway routes, CLI, docs."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import typer

from creditworker.cli import app as cli_app
from creditworker.credits import CreditService
from creditworker.operations import BY_REQUEST, BY_TASK, OPERATIONS, Operation, contract_table
from creditworker.settings import Settings
from creditworker.subscriptions import SubscriptionService
from creditworker.worker import tasks
from creditworker.worker.app import make_celery
from creditworker.worker.gather import GatheredTask
from producers import AsyncCreditClient, CreditClient

ROOT = Path(__file__).resolve().parents[2]
PRODUCED = [operation for operation in OPERATIONS if operation.producer]
CLIENT_ONLY = {"timeout"}
"""Arguments a producer method may have beyond its request's fields."""


def _ids(operation: Operation) -> str:
    return operation.task


def test_task_names_and_request_models_are_unique() -> None:
    assert len(BY_TASK) == len(OPERATIONS)
    assert len({operation.request for operation in PRODUCED}) == len(PRODUCED)


def test_every_operation_has_an_engine_method_or_an_adapter_never_both() -> None:
    with_adapter = {operation.task for operation in OPERATIONS if operation.engine is None}
    assert set(tasks.ADAPTERS) == with_adapter


@pytest.mark.parametrize("operation", [op for op in OPERATIONS if op.engine], ids=_ids)
def test_the_engine_method_takes_the_request_fields(operation: Operation) -> None:
    assert operation.engine is not None
    owner, method = operation.engine.split(".")
    service = CreditService if owner == "credits" else SubscriptionService
    parameters = inspect.signature(getattr(service, method)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    wanted = set(operation.request.model_fields) | ({"idempotency_key"} if operation.keyed else set())
    assert takes_any or wanted <= set(parameters), wanted - set(parameters)
    if operation.keyed:
        assert "idempotency_key" in parameters  # a write is idempotent on redelivery


def test_every_operation_is_a_task_of_the_app_and_the_gathered_ones_gather() -> None:
    app = make_celery(Settings(broker_url="redis://127.0.0.1:1/0"))  # never connects
    for operation in OPERATIONS:
        task = app.tasks[operation.task]
        assert isinstance(task, GatheredTask) == operation.gathered, operation.task


@pytest.mark.parametrize("client", [CreditClient, AsyncCreditClient])
@pytest.mark.parametrize("operation", PRODUCED, ids=_ids)
def test_each_producer_method_takes_its_request_fields(client: type, operation: Operation) -> None:
    """The typed methods stay (people read them, editors complete them); they must not drift."""
    assert operation.producer is not None
    parameters = dict(inspect.signature(getattr(client, operation.producer)).parameters)
    parameters.pop("self")
    fields = set(operation.request.model_fields)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):  # update_plan
        named = {name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        assert named <= fields
    else:
        assert set(parameters) - CLIENT_ONLY == fields


@pytest.mark.parametrize("client", [CreditClient, AsyncCreditClient])
def test_reserve_and_wait_takes_the_reserve_fields_and_a_timeout(client: type) -> None:
    parameters = set(inspect.signature(client.reserve_credits).parameters) - {"self"}
    assert parameters == set(BY_TASK["creditworker.credits.reserve"].request.model_fields) | {"timeout"}


SAMPLES: dict[str, Any] = {
    "user_id": "ann", "amount": 5, "reservation_id": "r-1", "plan": "basic", "name": "basic",
    "credit_limit": 10, "operations": [{"op": "deduct", "user_id": "ann", "amount": 1}],
}


class _Recording(CreditClient):
    def __init__(self) -> None:  # no app: nothing is sent
        self.sent: list[Any] = []

    def _send(self, request: Any) -> Any:
        self.sent.append(request)
        return None


@pytest.mark.parametrize("operation", PRODUCED, ids=_ids)
def test_each_producer_method_sends_its_operations_task(operation: Operation) -> None:
    assert operation.producer is not None
    client = _Recording()
    method = getattr(client, operation.producer)
    required = [name for name, p in inspect.signature(method).parameters.items()
                if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD]
    method(**{name: SAMPLES[name] for name in required})
    (request,) = client.sent
    assert BY_REQUEST[type(request)] is operation


def test_the_gateway_serves_the_registry_routes() -> None:
    from creditworker.http.gateway import build_router

    async def open_door() -> None:
        return None

    router = build_router(auth=open_door)  # in process: exactly the registry's routes
    served = {(method, route.path) for route in router.routes for method in route.methods}  # type: ignore[attr-defined]
    registered = {(op.route.method, op.route.path) for op in OPERATIONS if op.route}
    assert served == registered  # the worker mode adds GET /credits/tasks/{task_id}: tests/inprocess


@pytest.mark.parametrize("operation", [op for op in OPERATIONS if op.cli], ids=_ids)
def test_the_cli_has_the_registry_commands(operation: Operation) -> None:
    assert operation.cli is not None
    group: Any = typer.main.get_command(cli_app)
    for word in operation.cli.split():
        group = group.commands[word]


def test_the_node_producer_sends_a_registry_task() -> None:
    source = (ROOT / "producers" / "node" / "deduct.js").read_text()
    assert "'creditworker.credits.deduct'" in source and "creditworker.credits.deduct" in BY_TASK


def _documented_table() -> str:
    lines = (ROOT / "docs" / "worker.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| task | keyword arguments"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def test_the_documented_wire_contract_is_the_registry() -> None:
    assert _documented_table() == contract_table()
