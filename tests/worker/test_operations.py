"""The registry of operations (creditworker/contract/operations.py) and the edges derived from it or
checked against it: tasks, engine methods, producer methods, gateway routes, CLI, docs."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer

from creditworker.cli.app import app as cli_app
from creditworker.cli.operations import OPERATION_COMMANDS, OperationCommand
from creditworker.contract.operations import (
    BY_REQUEST,
    BY_TASK,
    DEDUCT,
    OPERATIONS,
    Operation,
    contract_table,
)
from creditworker.engine import CreditService, SubscriptionService
from creditworker.settings import Settings
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
    for name, field in operation.request.model_fields.items():  # the engine parses its arguments
        if name in parameters:  # into the request: its own default would replace the model's
            default = parameters[name].default
            assert (default is inspect.Parameter.empty) == field.is_required(), name
            assert default in (inspect.Parameter.empty, None) or default == field.default, name


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
@pytest.mark.parametrize("operation", PRODUCED, ids=_ids)
def test_each_producer_method_requires_and_defaults_as_its_request_does(
    client: type, operation: Operation
) -> None:
    """A method's own default would be sent in place of the model's: only None may differ."""
    assert operation.producer is not None
    parameters = {name: p for name, p in inspect.signature(getattr(client, operation.producer)).parameters.items()
                  if name not in {"self", *CLIENT_ONLY} and p.kind is not inspect.Parameter.VAR_KEYWORD}
    fields = operation.request.model_fields
    required = {name for name, p in parameters.items() if p.default is inspect.Parameter.empty}
    assert required == {name for name, field in fields.items() if field.is_required()}
    for name, parameter in parameters.items():
        if parameter.default not in (inspect.Parameter.empty, None):
            assert parameter.default == fields[name].default, name


@pytest.mark.parametrize("client", [CreditClient, AsyncCreditClient])
def test_reserve_and_wait_takes_the_reserve_fields_and_a_timeout(client: type) -> None:
    parameters = set(inspect.signature(client.reserve_credits).parameters) - {"self"}
    assert parameters == set(BY_TASK["creditworker.credits.reserve"].request.model_fields) | {"timeout"}


SAMPLES: dict[str, Any] = {
    "user_id": "ann", "amount": 5, "reservation_id": "r-1", "plan": "basic", "name": "basic",
    "credit_limit": 10, "operations": [{"op": "deduct", "user_id": "ann", "amount": 1}],
    "start": "2026-01-01T00:00:00Z", "end": "2026-02-01T00:00:00Z",
    "lot_id": 7, "entry_id": 42, "reason": "refund", "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
    "threshold": 5, "topup_id": 3, "succeeded": True,
}
ALSO_NEEDED: dict[str, dict[str, Any]] = {"set_auto_topup": {"amount": 10}}
"""Optional arguments a method needs one of (a rule buys an amount or up to a target)."""


class _Recording(CreditClient):
    def __init__(self) -> None:  # no app: nothing is sent
        self.sent: list[Any] = []

    def _send(self, request: Any) -> Any:
        self.sent.append(request)
        return None


def _required_samples(method: Any) -> dict[str, Any]:
    return {**{name: SAMPLES[name] for name, p in inspect.signature(method).parameters.items()
               if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD},
            **ALSO_NEEDED.get(method.__name__, {})}


@pytest.mark.parametrize("operation", PRODUCED, ids=_ids)
def test_each_producer_method_sends_its_operations_task(operation: Operation) -> None:
    assert operation.producer is not None
    client = _Recording()
    method = getattr(client, operation.producer)
    method(**_required_samples(method))
    (request,) = client.sent
    assert BY_REQUEST[type(request)] is operation


@pytest.mark.parametrize("operation", PRODUCED, ids=_ids)
def test_each_async_producer_method_sends_its_operations_task(operation: Operation) -> None:
    """The async methods name the sync method they run in a thread: the name must be theirs."""
    assert operation.producer is not None
    client = AsyncCreditClient.__new__(AsyncCreditClient)  # no app: nothing is sent
    client.sync = recording = _Recording()
    client._executor = ThreadPoolExecutor(1)
    try:
        method = getattr(client, operation.producer)
        asyncio.run(method(**_required_samples(method)))
    finally:
        client._executor.shutdown()
    (request,) = recording.sent
    assert BY_REQUEST[type(request)] is operation


def test_the_gateway_serves_the_registry_routes() -> None:
    from creditworker.http import build_router

    async def open_door() -> None:
        return None

    router = build_router(auth=open_door)  # in process: exactly the registry's routes
    served = {(method, route.path) for route in router.routes for method in route.methods}  # type: ignore[attr-defined]
    registered = {(op.route.method, op.route.path) for op in OPERATIONS if op.route}
    assert served == registered  # the worker mode adds GET /credits/tasks/{task_id}: tests/inprocess


def _click_command(cli_name: str) -> Any:
    group: Any = typer.main.get_command(cli_app)
    for word in cli_name.split():
        group = group.commands[word]
    return group


def test_the_cli_runs_the_operations_the_registry_gives_a_command() -> None:
    assert set(OPERATION_COMMANDS) == {operation.cli for operation in OPERATIONS if operation.cli}
    for name, command in OPERATION_COMMANDS.items():
        assert command.operation.cli == name
        assert inspect.unwrap(_click_command(name).callback) is command.function


@pytest.mark.parametrize("command", OPERATION_COMMANDS.values(), ids=lambda command: command.operation.cli)
def test_each_cli_command_takes_its_request_fields(command: OperationCommand) -> None:
    """Every field is a parameter (under its own name or a declared one) unless declared left
    out; a required field is an argument, an optional one an option."""
    fields = command.operation.request.model_fields
    parameters = set(inspect.signature(command.function).parameters) - {"as_json"}
    assert command.cli_only <= parameters and command.left_out <= set(fields)
    assert set(command.renamed) <= parameters and set(command.renamed.values()) <= set(fields)
    filled = {command.renamed.get(name, name) for name in parameters - command.cli_only}
    assert filled == set(fields) - command.left_out
    renamed_back = {field: name for name, field in command.renamed.items()}
    for param in _click_command(command.operation.cli).params:
        field = renamed_back.get(param.name, param.name)
        if field in fields:
            assert (param.param_type_name == "argument") == fields[field].is_required(), field


def test_the_node_producer_sends_the_deduct_task_with_its_request_fields() -> None:
    """producers/node/deduct.js writes the task name and argument names out (it needs nothing
    beyond Node); they must be the registry's."""
    source = (ROOT / "producers" / "node" / "deduct.js").read_text()
    (task,) = re.findall(r"^const TASK = '([^']+)';$", source, re.MULTILINE)
    (literal,) = re.findall(r"const kwargs = \{([^}]*)\}", source)
    sent = set(re.findall(r"(\w+):", literal)) | set(re.findall(r"kwargs\.(\w+) =", source))
    assert task == DEDUCT.task
    assert sent <= set(DEDUCT.request.model_fields), sent - set(DEDUCT.request.model_fields)
    assert {name for name, field in DEDUCT.request.model_fields.items() if field.is_required()} <= sent
    assert "idempotency_key" in sent


def _documented_table() -> str:
    lines = (ROOT / "docs" / "worker.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| task | keyword arguments"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def test_the_documented_wire_contract_is_the_registry() -> None:
    assert _documented_table() == contract_table()


def test_each_gateway_body_is_its_request_without_the_path() -> None:
    """A route's JSON body and its path parameters are its request's fields, each body field
    typed as the request types it (the bodies are derived from the contract: a body written
    by hand that drifts from it fails here)."""
    from fastapi import FastAPI

    from creditworker.http import build_router

    async def open_door() -> None:
        return None

    app = FastAPI()
    app.include_router(build_router(auth=open_door))
    document = app.openapi()
    schemas = document["components"]["schemas"]
    checked = 0
    for operation in OPERATIONS:
        if operation.route is None:
            continue
        path = operation.route.path.replace(":path}", "}")  # OpenAPI names a path converter's parameter alone
        served = document["paths"][path][operation.route.method.lower()]
        content = served.get("requestBody", {}).get("content", {}).get("application/json")
        if content is None:
            continue
        reference = content["schema"].get("$ref") or next(
            option["$ref"] for option in content["schema"]["anyOf"] if "$ref" in option)
        body = schemas[reference.rsplit("/", 1)[1]]["properties"]
        in_path = {parameter["name"] for parameter in served.get("parameters", []) if parameter["in"] == "path"}
        request = operation.request.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
        assert set(body) | in_path == set(request), operation.task
        assert not set(body) & in_path, operation.task
        for name, schema in body.items():
            assert _no_null_default(schema) == _no_null_default(request[name]), (operation.task, name)
        checked += 1
    assert checked >= 15


def _no_null_default(schema: dict[str, Any]) -> Any:
    """A property's schema without `"default": null` (FastAPI leaves it out of some) and with
    the models it refers to by their own names (FastAPI names a request-side one `X-Input`)."""
    kept = {key: value for key, value in schema.items() if not (key == "default" and value is None)}
    return json.loads(json.dumps(kept).replace('-Input"', '"'))
