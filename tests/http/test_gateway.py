"""The HTTP gateway against a real worker on Redis and PostgreSQL: every route, every status."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from httpx import Response
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from creditworker.contract.errors import UnknownUser
from creditworker.engine import SubscriptionService
from creditworker.http.api.app import create_app
from creditworker.http.api.routing import build_router
from creditworker.http.auth import API_KEYS_VARIABLE
from creditworker.settings import Settings
from producers.aio import AsyncCreditClient
from tests.e2e.conftest import RunningWorker

pytestmark = pytest.mark.e2e

API_KEY = "gateway-test-key"
SECOND_KEY = "second-test-key"
CLOSED_BROKER = "redis://127.0.0.1:1/0"
CLOSED_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:1/test"
REDIS_DB = 9
"""Redis database of this module's broker (the `worker` fixture in conftest reads it): 10 to 15
belong to other tests and the benchmarks."""



def gateway_settings(worker: RunningWorker, **changes: Any) -> Settings:
    """The worker's broker and result backend, and its database, as the gateway sees them."""
    return worker.settings.model_copy(
        update={
            "database_url": worker.env["CREDITWORKER_DATABASE_URL"],
            "result_backend": worker.result_backend,
            **changes,
        }
    )


def build_app(settings: Settings, api_keys: str | None) -> FastAPI:
    return create_app(settings.model_copy(update={"api_keys": api_keys or ""}))


def client_for(app: FastAPI, key: str | None = API_KEY) -> TestClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(app, headers=headers)


@pytest.fixture(scope="module")
def app(worker: RunningWorker) -> FastAPI:
    return build_app(gateway_settings(worker), f"{API_KEY}, {SECOND_KEY}")


@pytest.fixture(scope="module")
def http(app: FastAPI) -> TestClient:
    return client_for(app)


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def error_code(response: Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    return str(body["error"]["code"])


def finished(http: TestClient, task_id: str, timeout: float = 20) -> Response:
    """Poll the task route until the operation is no longer pending."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/credits/tasks/{task_id}")
        if response.status_code != 202:
            return response
        assert response.json() == {"task_id": task_id}
        assert time.monotonic() < deadline, f"task {task_id} never finished"
        time.sleep(0.05)


# ------------------------------------------------------------------ writes: queue or wait


def test_a_write_is_queued_with_202_and_its_result_polled(
    http: TestClient, worker: RunningWorker
) -> None:
    user = new_user()
    queued = http.post("/credits/add", json={"user_id": user, "amount": 100, "source": "bonus"})
    assert queued.status_code == 202
    task_id = queued.json()["task_id"]

    done = finished(http, task_id)
    assert done.status_code == 200
    assert (done.json()["kind"], done.json()["amount"], done.json()["user_id"]) == (
        "add",
        100,
        user,
    )
    assert worker.service.get_user_credits_info(user).total == 100


def test_a_refused_queued_write_polls_as_its_error(http: TestClient) -> None:
    queued = http.post("/credits/deduct", json={"user_id": new_user(), "amount": 5})
    assert queued.status_code == 202
    refused = finished(http, queued.json()["task_id"])
    assert (refused.status_code, error_code(refused)) == (404, "unknown_user")


def test_waiting_returns_the_result(http: TestClient, worker: RunningWorker) -> None:
    user = new_user()
    added = http.post(
        "/credits/add", params={"wait": "true"}, json={"user_id": user, "amount": 100}
    )
    assert added.status_code == 200 and added.json()["balance_after"] == 100

    deducted = http.post(
        "/credits/deduct",
        headers={"Prefer": "respond-async, wait=5"},
        json={"user_id": user, "amount": 30, "description": "export"},
    )
    assert deducted.status_code == 200
    assert (deducted.json()["amount"], deducted.json()["balance_after"]) == (-30, 70)
    assert worker.service.get_user_credits_info(user).total == 70


def test_an_unknown_task_stays_pending_and_a_malformed_id_is_invalid(http: TestClient) -> None:
    task_id = str(uuid.uuid4())
    assert http.get(f"/credits/tasks/{task_id}").json() == {"task_id": task_id}
    assert http.get(f"/credits/tasks/{task_id}").status_code == 202
    response = http.get("/credits/tasks/not-a-task")
    assert (response.status_code, error_code(response)) == (422, "invalid_input")


def test_an_idempotency_key_header_repeat_returns_the_first_result_and_changes_nothing(
    http: TestClient, worker: RunningWorker
) -> None:
    user, key = new_user(), f"order-{uuid.uuid4().hex}"
    body = {"user_id": user, "amount": 100}
    first = http.post("/credits/add?wait=true", json=body, headers={"Idempotency-Key": key})
    again = http.post("/credits/add?wait=true", json=body, headers={"Idempotency-Key": key})
    same_key_in_body = http.post(
        "/credits/add?wait=true",
        json={**body, "idempotency_key": key},
        headers={"Idempotency-Key": key},
    )
    queued_twice = [
        http.post("/credits/add", json=body, headers={"Idempotency-Key": key}) for _ in range(2)
    ]
    polled = [finished(http, response.json()["task_id"]) for response in queued_twice]

    assert first.status_code == 200 and first.json()["idempotency_key"] == key
    assert again.json() == first.json() == same_key_in_body.json()
    assert [response.json() for response in polled] == [first.json()] * 2
    assert worker.service.get_user_credits_info(user).total == 100
    assert [entry.idempotency_key for entry in worker.service.get_history(user)] == [key]

    differing = http.post(
        "/credits/add?wait=true",
        json={**body, "idempotency_key": "other"},
        headers={"Idempotency-Key": key},
    )
    assert (differing.status_code, error_code(differing)) == (422, "invalid_input")
    conflict = http.post(
        "/credits/add?wait=true", json={**body, "amount": 50}, headers={"Idempotency-Key": key}
    )
    assert (conflict.status_code, error_code(conflict)) == (409, "idempotency_conflict")
    assert worker.service.get_user_credits_info(user).total == 100
    assert len(worker.service.get_history(user)) == 1


def test_a_deduct_beyond_the_balance_is_402_and_changes_nothing(
    http: TestClient, worker: RunningWorker
) -> None:
    user = new_user()
    worker.client.add_credits(user, 10).get()
    response = http.post("/credits/deduct?wait=true", json={"user_id": user, "amount": 11})
    assert (response.status_code, error_code(response)) == (402, "insufficient_credits")
    assert response.json()["error"]["details"]["available"] == 10
    assert worker.service.get_user_credits_info(user).total == 10


# ------------------------------------------------------------------ reservations


def test_reserve_then_commit_the_actual_amount(http: TestClient, worker: RunningWorker) -> None:
    user = new_user()
    worker.client.add_credits(user, 100).get()
    reserved = http.post("/credits/reserve", json={"user_id": user, "amount": 20})
    assert reserved.status_code == 201 and reserved.json()["status"] == "active"
    reservation_id = reserved.json()["id"]
    assert http.get(f"/credits/balance/{user}").json()["available"] == 80
    assert http.get(f"/credits/reservations/{reservation_id}").json()["status"] == "active"

    committed = http.post(
        f"/credits/reservations/{reservation_id}/commit?wait=true", json={"amount": 12}
    )
    assert committed.status_code == 200
    assert (committed.json()["kind"], committed.json()["amount"]) == ("commit", -12)
    shown = http.get(f"/credits/reservations/{reservation_id}").json()
    assert (shown["status"], shown["committed_amount"]) == ("committed", 12)
    info = worker.service.get_user_credits_info(user)
    assert (info.total, info.reserved, info.available) == (88, 0, 88)

    again = http.post(
        f"/credits/reservations/{reservation_id}/commit?wait=true", json={"amount": 1}
    )
    assert (again.status_code, error_code(again)) == (409, "reservation_not_active")
    assert worker.service.get_user_credits_info(user).total == 88


def test_a_queued_commit_without_a_body_charges_the_amount_held(
    http: TestClient, worker: RunningWorker
) -> None:
    user = new_user()
    worker.client.add_credits(user, 50).get()
    reservation_id = http.post("/credits/reserve", json={"user_id": user, "amount": 15}).json()[
        "id"
    ]
    queued = http.post(f"/credits/reservations/{reservation_id}/commit")
    assert queued.status_code == 202
    assert finished(http, queued.json()["task_id"]).json()["amount"] == -15
    assert worker.service.get_user_credits_info(user).total == 35


def test_release_frees_the_hold_without_charging(http: TestClient, worker: RunningWorker) -> None:
    user = new_user()
    worker.client.add_credits(user, 50).get()
    reservation_id = http.post("/credits/reserve", json={"user_id": user, "amount": 30}).json()[
        "id"
    ]
    released = http.post(
        f"/credits/reservations/{reservation_id}/release?wait=true",
        headers={"Idempotency-Key": f"release-{reservation_id}"},
    )
    assert released.status_code == 200 and released.json()["kind"] == "release"
    assert http.get(f"/credits/reservations/{reservation_id}").json()["status"] == "released"
    info = worker.service.get_user_credits_info(user)
    assert (info.total, info.reserved) == (50, 0)


def test_a_reservation_beyond_the_available_credits_is_402(
    http: TestClient, worker: RunningWorker
) -> None:
    user = new_user()
    worker.client.add_credits(user, 10).get()
    response = http.post("/credits/reserve", json={"user_id": user, "amount": 11})
    assert (response.status_code, error_code(response)) == (402, "insufficient_credits")
    assert worker.service.get_user_credits_info(user).reserved == 0


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("get", "/credits/balance/{user}", "unknown_user"),
        ("get", "/credits/history/{user}", "unknown_user"),
        ("get", "/credits/expiring/{user}", "unknown_user"),
        ("post", "/credits/subscriptions/{user}/change?wait=true", "unknown_user"),
        ("get", "/credits/reservations/{thing}", "unknown_reservation"),
        ("post", "/credits/reservations/{thing}/commit?wait=true", "unknown_reservation"),
        ("post", "/credits/reservations/{thing}/release?wait=true", "unknown_reservation"),
        ("get", "/credits/plans/{thing}", "unknown_plan"),
        ("patch", "/credits/plans/{thing}?wait=true", "unknown_plan"),
        ("delete", "/credits/plans/{thing}?wait=true", "unknown_plan"),
        ("put", "/credits/subscriptions/{customer}?wait=true", "unknown_plan"),
        ("get", "/credits/subscriptions/{customer}", "unknown_subscription"),
        ("post", "/credits/subscriptions/{customer}/change?wait=true", "unknown_subscription"),
        ("delete", "/credits/subscriptions/{customer}?wait=true", "unknown_subscription"),
    ],
)
def test_unknown_things_are_404(
    http: TestClient, worker: RunningWorker, method: str, path: str, code: str
) -> None:
    """`user` never had credits; `customer` has credits but no subscription."""
    customer = new_user()
    worker.client.add_credits(customer, 1).get()
    url = path.format(user=new_user(), thing=uuid.uuid4().hex, customer=customer)
    body: dict[str, Any] | None = {"plan": f"no-such-plan-{uuid.uuid4().hex}"}
    if method == "patch":
        body = {"credit_limit": 5}
    elif method not in ("put", "post") or "reservations" in url:
        body = None
    response = http.request(method.upper(), url, json=body)
    assert (response.status_code, error_code(response)) == (404, code)


def test_reserve_for_an_unknown_user_is_404(http: TestClient) -> None:
    response = http.post("/credits/reserve", json={"user_id": new_user(), "amount": 1})
    assert (response.status_code, error_code(response)) == (404, "unknown_user")


# ------------------------------------------------------------------ reads


def test_history_pages_newest_first_and_filters_by_kind(
    http: TestClient, worker: RunningWorker
) -> None:
    user = new_user()
    for amount in (10, 20, 30):
        worker.client.add_credits(user, amount).get()
    worker.client.deduct_credits(user, 5).get()

    first = http.get(f"/credits/history/{user}", params={"limit": 2}).json()
    assert [(e["kind"], e["amount"]) for e in first["entries"]] == [("deduct", -5), ("add", 30)]
    assert first["next_before"] == first["entries"][-1]["id"]
    second = http.get(
        f"/credits/history/{user}", params={"limit": 2, "before": first["next_before"]}
    ).json()
    assert [e["amount"] for e in second["entries"]] == [20, 10]
    last = http.get(
        f"/credits/history/{user}", params={"limit": 2, "before": second["next_before"]}
    ).json()
    assert last == {"entries": [], "next_before": None}

    deducts = http.get(f"/credits/history/{user}", params={"kind": "deduct"}).json()
    assert [e["kind"] for e in deducts["entries"]] == ["deduct"] and deducts["next_before"] is None
    both = http.get(f"/credits/history/{user}", params=[("kind", "add"), ("kind", "deduct")]).json()
    assert len(both["entries"]) == 4


def test_expiring_lists_lots_within_the_horizon(http: TestClient, worker: RunningWorker) -> None:
    user = new_user()
    soon = datetime.now(UTC) + timedelta(days=2)
    worker.client.add_credits(user, 40, expires_at=soon).get()
    worker.client.add_credits(user, 60).get()
    within_week = http.get(f"/credits/expiring/{user}", params={"within_days": 7})
    assert within_week.status_code == 200
    assert [(lot["amount"], lot["remaining"]) for lot in within_week.json()] == [(40, 40)]
    assert http.get(f"/credits/expiring/{user}", params={"within_days": 1}).json() == []
    balance = http.get(f"/credits/balance/{user}").json()
    assert (balance["total"], balance["expiring_soon"]) == (100, 40)


# ------------------------------------------------------------------ plans and subscriptions


def test_plans_are_created_listed_changed_and_deleted(http: TestClient) -> None:
    name = f"pro-{uuid.uuid4().hex[:8]}"
    created = http.post(
        "/credits/plans?wait=true", json={"name": name, "credit_limit": 100, "price": "9.90"}
    )
    assert created.status_code == 201
    plan = created.json()
    assert (plan["name"], plan["credit_limit"], plan["active"]) == (name, 100, True)

    duplicate = http.post("/credits/plans?wait=true", json={"name": name, "credit_limit": 5})
    assert (duplicate.status_code, error_code(duplicate)) == (409, "duplicate_plan")
    assert name in [p["name"] for p in http.get("/credits/plans").json()]
    by_name, by_id = (
        http.get(f"/credits/plans/{name}").json(),
        http.get(f"/credits/plans/{plan['id']}").json(),
    )
    assert by_name == by_id and by_id["id"] == plan["id"]
    assert Decimal(by_id["price"]) == Decimal(plan["price"]) == Decimal("9.9")

    changed = http.patch(f"/credits/plans/{name}?wait=true", json={"credit_limit": 120})
    assert changed.status_code == 200 and changed.json()["credit_limit"] == 120
    assert http.get(f"/credits/plans/{plan['id']}").json()["credit_limit"] == 120

    queued = http.delete(f"/credits/plans/{plan['id']}")
    assert queued.status_code == 202
    assert finished(http, queued.json()["task_id"]).json() == {"deleted": plan["id"]}
    gone = http.get(f"/credits/plans/{name}")
    assert (gone.status_code, error_code(gone)) == (404, "unknown_plan")


def test_subscriptions_are_assigned_changed_and_removed(
    http: TestClient, worker: RunningWorker
) -> None:
    user, suffix = new_user(), uuid.uuid4().hex[:8]
    pro = http.post(
        "/credits/plans?wait=true", json={"name": f"pro-{suffix}", "credit_limit": 100}
    ).json()
    basic = http.post(
        "/credits/plans?wait=true", json={"name": f"basic-{suffix}", "credit_limit": 10}
    ).json()

    assigned = http.put(f"/credits/subscriptions/{user}?wait=true", json={"plan": pro["name"]})
    assert assigned.status_code == 200
    assert (assigned.json()["plan_id"], assigned.json()["status"]) == (pro["id"], "active")
    assert http.get(f"/credits/subscriptions/{user}").json() == assigned.json()
    assert worker.service.get_user_credits_info(user).total == 100

    in_use = http.delete(f"/credits/plans/{pro['id']}?wait=true")
    assert (in_use.status_code, error_code(in_use)) == (409, "plan_in_use")
    assert pro["id"] not in [p["id"] for p in http.get("/credits/plans").json()]
    listed = http.get("/credits/plans", params={"include_inactive": "true"}).json()
    assert [p["active"] for p in listed if p["id"] == pro["id"]] == [False]

    downgraded = http.post(
        f"/credits/subscriptions/{user}/change?wait=true", json={"plan": basic["id"]}
    )
    assert downgraded.status_code == 200 and downgraded.json()["pending_plan_id"] == basic["id"]

    ending = http.delete(f"/credits/subscriptions/{user}?wait=true")
    assert ending.status_code == 200 and ending.json()["cancel_at_period_end"] is True
    ended = http.delete(
        f"/credits/subscriptions/{user}", params={"at_period_end": "false", "wait": "true"}
    )
    assert ended.status_code == 200 and ended.json()["status"] != "active"
    missing = http.get(f"/credits/subscriptions/{user}")
    assert (missing.status_code, error_code(missing)) == (404, "unknown_subscription")


# ------------------------------------------------------------------ ids with a slash


def test_a_user_id_and_a_plan_name_with_a_slash_are_reachable_on_every_route(
    http: TestClient, worker: RunningWorker, tmp_path: Path
) -> None:
    """Ids are the contract's, `/` included, on every entry point: the producer, the CLI and
    every gateway route (percent-encoded, and with the slash as it is)."""
    user, plan = f"tenant-{uuid.uuid4().hex[:8]}/alice", f"team/{uuid.uuid4().hex[:8]}"
    encoded_user, encoded_plan = quote(user, safe=""), quote(plan, safe="")
    worker.client.add_credits(user, 100, expires_at=datetime.now(UTC) + timedelta(days=1)).get()

    for path_user in (encoded_user, user):
        balance = http.get(f"/credits/balance/{path_user}")
        assert (balance.status_code, balance.json()["user_id"]) == (200, user), balance.text
    history = http.get(f"/credits/history/{encoded_user}").json()["entries"]
    assert [entry["user_id"] for entry in history] == [user]
    assert http.get(f"/credits/expiring/{encoded_user}").json()[0]["user_id"] == user
    deducted = http.post("/credits/deduct?wait=true", json={"user_id": user, "amount": 10})
    assert deducted.json()["balance_after"] == 90

    created = http.post("/credits/plans?wait=true", json={"name": plan, "credit_limit": 5})
    assert created.status_code == 201
    assert http.get(f"/credits/plans/{encoded_plan}").json()["id"] == created.json()["id"]
    changed = http.patch(f"/credits/plans/{encoded_plan}?wait=true", json={"credit_limit": 6})
    assert changed.json()["credit_limit"] == 6

    assigned = http.put(f"/credits/subscriptions/{encoded_user}?wait=true", json={"plan": plan})
    assert (assigned.status_code, assigned.json()["user_id"]) == (200, user), assigned.text
    assert http.get(f"/credits/subscriptions/{encoded_user}").json() == assigned.json()
    smaller = http.post(
        "/credits/plans?wait=true", json={"name": f"{plan}/small", "credit_limit": 1}
    ).json()
    downgraded = http.post(
        f"/credits/subscriptions/{encoded_user}/change?wait=true", json={"plan": smaller["name"]}
    )
    assert (downgraded.status_code, downgraded.json()["user_id"]) == (200, user), downgraded.text
    assert downgraded.json()["pending_plan_id"] == smaller["id"]
    removed = http.delete(f"/credits/subscriptions/{encoded_user}?wait=true&at_period_end=false")
    assert (removed.status_code, removed.json()["user_id"]) == (200, user), removed.text
    assert worker.service.get_user_credits_info(user).total == 96  # 100 - 10 + 6 granted

    cli = subprocess.run(
        ["creditworker", "balance", user, "--json"], env=worker.env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["user_id"] == user


def test_a_user_id_that_is_a_dot_segment_is_reachable_percent_encoded(
    http: TestClient, worker: RunningWorker
) -> None:
    """`.` and `..` would be removed from a URL as dot segments: `%2E%2E` keeps them."""
    user = f"{uuid.uuid4().hex[:8]}/.."
    worker.client.add_credits(user, 3).get()
    encoded = quote(user, safe="").replace(".", "%2E")
    assert http.get(f"/credits/balance/{encoded}").json()["user_id"] == user


# ------------------------------------------------------------------ Idempotency-Key header


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_non_ascii_idempotency_key_header_is_refused_so_it_never_charges_twice(
    http: TestClient, worker: RunningWorker, encoding: str
) -> None:
    """Clients send such a header in UTF-8 (curl, Go) or latin-1 (requests, browsers), and the
    server cannot tell which: refused, so the same key in a body cannot be a second key."""
    user, key = new_user(), f"commande-é-{uuid.uuid4().hex[:8]}"
    worker.client.add_credits(user, 100).get()
    body = {"user_id": user, "amount": 10}
    in_header = http.post(
        "/credits/deduct?wait=true", json=body, headers={"Idempotency-Key": key.encode(encoding)}
    )
    in_body = http.post("/credits/deduct?wait=true", json={**body, "idempotency_key": key})
    again_in_body = http.post("/credits/deduct?wait=true", json={**body, "idempotency_key": key})

    assert (in_header.status_code, error_code(in_header)) == (422, "invalid_input")
    message = in_header.json()["error"]["message"]
    assert "header.Idempotency-Key" in message and "ASCII" in message, message
    assert in_body.status_code == 200 and again_in_body.json() == in_body.json()
    assert in_body.json()["idempotency_key"] == key
    assert worker.service.get_user_credits_info(user).total == 90


def test_an_ascii_key_in_the_header_once_and_in_the_body_once_is_one_key(
    http: TestClient, worker: RunningWorker
) -> None:
    user, key = new_user(), f"order-{uuid.uuid4().hex}"
    worker.client.add_credits(user, 100).get()
    body = {"user_id": user, "amount": 10}
    in_header = http.post("/credits/deduct?wait=true", json=body, headers={"Idempotency-Key": key})
    in_body = http.post("/credits/deduct?wait=true", json={**body, "idempotency_key": key})
    assert in_header.status_code == 200 and in_body.json() == in_header.json()
    assert worker.service.get_user_credits_info(user).total == 90


# ------------------------------------------------------------------ error messages


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("get", "/credits/balance/%20alice", "path.user_id"),
        ("get", "/credits/history/%20alice", "path.user_id"),
        ("get", "/credits/expiring/%20alice", "path.user_id"),
        ("get", "/credits/subscriptions/%20alice", "path.user_id"),
        ("delete", "/credits/subscriptions/%20alice", "path.user_id"),
        ("get", f"/credits/balance/{'x' * 129}", "path.user_id"),
        ("get", "/credits/reservations/a%00b", "path.reservation_id"),
        ("post", "/credits/reservations/a%00b/commit", "path.reservation_id"),
        ("get", "/credits/plans/a%07b", "path.plan"),
        ("get", "/credits/expiring/alice?within_days=99999", "query.within_days"),
        ("get", "/credits/history/alice?limit=0", "query.limit"),
        ("get", "/credits/history/alice?before=0", "query.before"),
    ],
)
def test_a_bad_value_in_the_url_is_named_by_where_it_is(
    http: TestClient, method: str, path: str, field: str
) -> None:
    """Not by the engine's model (a bad id on the balance route once said `invalid GetExpiring`)."""
    response = http.request(method.upper(), path)
    assert (response.status_code, error_code(response)) == (422, "invalid_input")
    error = response.json()["error"]
    assert [problem["field"] for problem in error["details"]["problems"]] == [field], error
    assert error["message"].startswith(f"invalid request: {field}: "), error["message"]


# ------------------------------------------------------------------ invalid input


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/credits/add", {"user_id": "alice", "amount": -5}),
        ("post", "/credits/add", {"user_id": "alice", "amount": "10"}),
        ("post", "/credits/add", {"user_id": "alice", "amount": 10, "colour": "red"}),
        ("post", "/credits/add", {"user_id": " alice", "amount": 10}),
        ("post", "/credits/deduct", {"user_id": "alice"}),
        ("post", "/credits/reserve", {"user_id": "alice", "amount": 1, "ttl_seconds": 0}),
        ("post", "/credits/reservations/r1/commit", {"amount": -1}),
        ("post", "/credits/plans", {"name": "x", "credit_limit": 1, "currency": "usd"}),
        ("patch", "/credits/plans/x", {"price": "-1"}),
        ("put", "/credits/subscriptions/alice", {"plan": "x", "start_at": "yesterday"}),
        ("get", "/credits/history/alice?limit=0", None),
        ("get", "/credits/history/alice?limit=many", None),
        ("get", "/credits/history/alice?kind=gift", None),
        ("get", "/credits/expiring/alice?within_days=99999", None),
        ("get", "/credits/balance/%20alice", None),
        ("get", "/credits/subscriptions/a%00b", None),
        ("get", "/credits/reservations/a%00b", None),
        ("post", "/credits/reservations/a%00b/release", None),
        ("get", "/credits/plans/a%00b", None),
        ("delete", "/credits/plans/a%07b", None),
    ],
)
def test_invalid_input_is_422_naming_each_problem(
    http: TestClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = http.request(method.upper(), path, json=body)
    assert (response.status_code, error_code(response)) == (422, "invalid_input")
    assert response.json()["error"]["details"]["problems"]


def test_malformed_json_is_422(http: TestClient) -> None:
    response = http.post(
        "/credits/add", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert (response.status_code, error_code(response)) == (422, "invalid_input")


def test_unknown_routes_and_methods_answer_in_the_error_envelope(http: TestClient) -> None:
    missing = http.get("/credits/nothing-here")
    assert (missing.status_code, error_code(missing)) == (404, "not_found")
    wrong = http.put("/credits/add")
    assert (wrong.status_code, error_code(wrong)) == (405, "method_not_allowed")


# ------------------------------------------------------------------ auth


def test_every_route_needs_a_configured_api_key(app: FastAPI, worker: RunningWorker) -> None:
    user = new_user()
    for key in (None, "wrong-key"):
        refused = client_for(app, key).post(
            "/credits/add?wait=true", json={"user_id": user, "amount": 5}
        )
        assert (refused.status_code, error_code(refused)) == (401, "unauthorized")
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert client_for(app, key).get("/credits/plans").status_code == 401
    assert client_for(app, SECOND_KEY).get("/credits/plans").status_code == 200
    with pytest.raises(UnknownUser):  # nothing reached the workers
        worker.service.get_user_credits_info(user)


def test_without_keys_a_shared_broker_refuses_everything(worker: RunningWorker) -> None:
    closed = client_for(build_app(gateway_settings(worker), api_keys=None), key=API_KEY)
    response = closed.get("/credits/plans")
    assert (response.status_code, error_code(response)) == (401, "unauthorized")
    assert API_KEYS_VARIABLE in response.json()["error"]["message"]


def test_without_keys_the_embedded_broker_is_open(worker: RunningWorker, tmp_path: Path) -> None:
    embedded = gateway_settings(
        worker, broker_url="filesystem://", result_backend=None, data_dir=str(tmp_path / "data")
    )
    response = client_for(build_app(embedded, api_keys=None), key=None).get("/credits/plans")
    assert response.status_code == 200 and isinstance(response.json(), list)


def test_a_host_app_mounts_the_router_with_its_own_auth(worker: RunningWorker) -> None:
    from creditworker.engine import CreditService

    async def staff_only() -> None:
        raise HTTPException(403, "staff only")

    reads = CreditService(worker.env["CREDITWORKER_DATABASE_URL"])
    host = FastAPI()
    host.include_router(
        build_router(
            AsyncCreditClient(gateway_settings(worker)),
            reads,
            SubscriptionService(reads),
            staff_only,
        )
    )
    response = TestClient(host).get("/credits/plans")
    assert (response.status_code, error_code(response)) == (403, "forbidden")


# ------------------------------------------------------------------ 503


def test_a_broker_that_does_not_answer_is_503(worker: RunningWorker) -> None:
    # The result backend stays up: with both down, the producer's Celery result consumer
    # retries for ~20 s and raises RuntimeError rather than ServiceUnavailable.
    down = client_for(build_app(gateway_settings(worker, broker_url=CLOSED_BROKER), API_KEY))
    user = new_user()
    for response in (
        down.post("/credits/add", json={"user_id": user, "amount": 5}),
        down.post("/credits/reserve", json={"user_id": user, "amount": 5}),
    ):
        assert (response.status_code, error_code(response)) == (503, "service_unavailable")
        assert response.headers["Retry-After"] == "1"


def test_a_database_that_does_not_answer_is_503(worker: RunningWorker) -> None:
    down = client_for(build_app(gateway_settings(worker, database_url=CLOSED_DATABASE), API_KEY))
    for path in ("/credits/balance/alice", "/credits/plans", "/credits/reservations/r1"):
        response = down.get(path)
        assert (response.status_code, error_code(response)) == (503, "service_unavailable")


# ------------------------------------------------------------------ the whole schema


@pytest.fixture(scope="module")
def api_schema(app: FastAPI) -> Any:
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {
            "generation": {"max-examples": 30},
            "phases": {"stateful": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config)


def test_no_route_answers_a_server_error(api_schema: Any) -> None:
    """Schemathesis cases for every operation, driven by Hypothesis directly (schemathesis's
    pytest plugin breaks on pytest 9.2), each must get an answer below 500."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 19
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: Any) -> None:
            case.call_and_validate(
                headers={"Authorization": f"Bearer {API_KEY}"}, checks=[not_a_server_error]
            )

        no_server_error()


def test_every_route_has_a_tag_a_summary_and_an_example(app: FastAPI) -> None:
    document = app.openapi()
    operations = [
        (method, path, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]
    assert len(operations) >= 19
    for method, path, operation in operations:
        assert operation.get("tags"), (method, path)
        assert operation.get("summary"), (method, path)
        text = json.dumps({"responses": operation.get("responses"), "body": operation.get("requestBody")})
        assert '"example' in text, (method, path, "no example")


# ------------------------------------------------------------------ reports


def test_a_balance_at_a_moment_and_a_usage_report_over_http_and_through_the_worker(
    http: TestClient, worker: RunningWorker
) -> None:
    user = new_user()
    start = datetime(2031, 3, 1, tzinfo=UTC)
    worker.service.add_credits(user, 100, now=start)
    worker.service.deduct_credits(user, 30, now=start + timedelta(days=1))
    then = http.get(f"/credits/balance/{user}", params={"at": "2031-03-01T12:00:00"})  # naive: UTC
    assert then.status_code == 200, then.text
    assert (then.json()["total"], then.json()["at"]) == (100, "2031-03-01T12:00:00Z")
    window = {"start": "2031-03-01T00:00:00Z", "end": "2031-04-01T00:00:00Z", "user_id": user}
    report = http.get("/credits/usage", params={**window, "granularity": "month"})
    assert report.status_code == 200, report.text
    assert [(p["period"], p["granted"], p["consumed"]) for p in report.json()] == [("2031-03-01", 100, 30)]
    (daily,) = [worker.client.get_usage(user, start=start, end=start + timedelta(days=1)).get(timeout=20)]
    assert [(p.period.isoformat(), p.granted, p.consumed) for p in daily] == [("2031-03-01", 100, 0)]
    backwards = http.get("/credits/usage", params={**window, "start": "2031-05-01T00:00:00Z"})
    assert (backwards.status_code, error_code(backwards)) == (422, "invalid_input")
    assert "start must not be after end" in backwards.json()["error"]["message"] + str(backwards.json())
    weekly = http.get("/credits/usage", params={**window, "granularity": "week"})
    assert (weekly.status_code, error_code(weekly)) == (422, "invalid_input")
    nobody = http.get("/credits/usage", params={**window, "user_id": new_user()})
    assert (nobody.status_code, error_code(nobody)) == (404, "unknown_user")


# ------------------------------------------------------------------ credit types


def test_credit_types_over_http_and_through_the_worker_never_mix(http: TestClient, worker: RunningWorker) -> None:
    user = new_user()
    worker.client.add_credits(user, 10).get()
    worker.client.add_credits(user, 5, credit_type="images").get()
    granted = http.post("/credits/add?wait=true", json={"user_id": user, "amount": 3, "credit_type": "images"})
    assert (granted.status_code, granted.json()["credit_type"]) == (200, "images")
    spent = http.post("/credits/deduct?wait=true", json={"user_id": user, "amount": 8, "credit_type": "images"})
    assert (spent.status_code, spent.json()["balance_after"]) == (200, 0)
    refused = http.post("/credits/deduct?wait=true", json={"user_id": user, "amount": 1, "credit_type": "images"})
    assert (refused.status_code, error_code(refused)) == (402, "insufficient_credits")
    images = http.get(f"/credits/balance/{user}", params={"credit_type": "images"}).json()
    assert (images["credit_type"], images["total"], images["by_type"]) == ("images", 0, None)
    every = http.get(f"/credits/balance/{user}").json()
    assert (every["credit_type"], every["total"]) == ("credits", 10)
    assert {name: totals["total"] for name, totals in every["by_type"].items()} == {"credits": 10, "images": 0}
    bad = http.post("/credits/add?wait=true", json={"user_id": user, "amount": 1, "credit_type": "Not An Id"})
    assert (bad.status_code, error_code(bad)) == (422, "invalid_input")
    bad_query = http.get(f"/credits/balance/{user}", params={"credit_type": "Not An Id"})
    assert (bad_query.status_code, error_code(bad_query)) == (422, "invalid_input")
    assert worker.client.get_user_credits_info(user, credit_type="images").get(timeout=20).total == 0
    assert worker.service.get_user_credits_info(user).total == 10
    later = http.post("/credits/add?wait=true", json={
        "user_id": user, "amount": 7, "effective_at": "2099-01-01T00:00:00Z",
        "cost_basis": {"amount": "0.05", "currency": "EUR"}})
    assert later.status_code == 200, later.text
    pending = http.get(f"/credits/balance/{user}").json()
    assert (pending["total"], pending["pending"], pending["available"]) == (17, 7, 10)
    bad_currency = http.post("/credits/add?wait=true", json={
        "user_id": user, "amount": 1, "cost_basis": {"amount": "0.05", "currency": "euro"}})
    assert (bad_currency.status_code, error_code(bad_currency)) == (422, "invalid_input")
