"""The `/credits` router in process: every operation on an engine object, answered with its result."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from creditworker import CreditService
from creditworker.contract.operations import OPERATIONS
from creditworker.http import build_router, get_credit_service, router
from creditworker.http.api import deps
from creditworker.settings import Settings, get_settings
from producers.aio import AsyncCreditClient


@pytest.fixture
def http(credit_service: Any) -> Iterator[TestClient]:
    app = FastAPI()
    app.include_router(router)
    app.dependency_overrides[get_credit_service] = lambda: credit_service
    with TestClient(app) as client:
        yield client


def served(app_router: Any) -> set[tuple[str, str]]:
    return {(method, route.path) for route in app_router.routes if isinstance(route, APIRoute)
            for method in route.methods}


def test_every_registry_route_is_served_in_both_modes() -> None:
    routed = {(op.route.method, op.route.path.replace(":path", "")) for op in OPERATIONS if op.route}
    worker = build_router(AsyncCreditClient(Settings(broker_url="memory://")),
                          reads=CreditService("sqlite://"))
    for mode in (router, build_router(credit_service=CreditService("sqlite://")), worker):
        paths = {(method, path.replace(":path", "")) for method, path in served(mode)}
        assert routed <= paths
    assert served(router) == {(m, p) for m, p in served(worker) if p != "/credits/tasks/{task_id}"}


def test_credits_and_reservations_answer_with_their_results(http: TestClient) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    added = http.post("/credits/add", json={"user_id": user, "amount": 100, "description": "top-up"})
    assert added.status_code == 200, added.text
    assert (added.json()["kind"], added.json()["balance_after"]) == ("add", 100)
    assert http.post("/credits/deduct", json={"user_id": user, "amount": 30}).json()["balance_after"] == 70

    held = http.post("/credits/reserve", json={"user_id": user, "amount": 20})
    assert held.status_code == 201 and held.json()["status"] == "active"
    hold_id = held.json()["id"]
    committed = http.post(f"/credits/reservations/{hold_id}/commit", json={"amount": 12})
    assert committed.status_code == 200 and committed.json()["amount"] == -12
    assert http.get(f"/credits/reservations/{hold_id}").json()["status"] == "committed"
    other = http.post("/credits/reserve", json={"user_id": user, "amount": 5}).json()["id"]
    assert http.post(f"/credits/reservations/{other}/release").json()["kind"] == "release"

    balance = http.get(f"/credits/balance/{user}").json()
    assert (balance["total"], balance["reserved"], balance["available"]) == (58, 0, 58)
    history = http.get(f"/credits/history/{user}", params={"kind": ["add", "deduct"]}).json()
    assert [e["kind"] for e in history["entries"]] == ["deduct", "add"]
    assert http.get(f"/credits/expiring/{user}").json() == []
    http.post("/credits/add", json={"user_id": user, "amount": 3, "credit_type": "images"})
    images = http.get(f"/credits/history/{user}", params={"credit_type": "images"}).json()
    assert [(e["kind"], e["amount"], e["credit_type"]) for e in images["entries"]] == [("add", 3, "images")]
    bad_type = http.get(f"/credits/history/{user}", params={"credit_type": "Not An Id"})
    assert (bad_type.status_code, bad_type.json()["error"]["code"]) == (422, "invalid_input")


def test_refusals_keep_their_status_and_envelope(http: TestClient) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    http.post("/credits/add", json={"user_id": user, "amount": 10})
    too_much = http.post("/credits/deduct", json={"user_id": user, "amount": 50})
    assert too_much.status_code == 402 and too_much.json()["error"]["code"] == "insufficient_credits"
    assert http.get("/credits/balance/nobody-here").status_code == 404
    first = http.post("/credits/add", json={"user_id": user, "amount": 5}, headers={"Idempotency-Key": "k1"})
    again = http.post("/credits/add", json={"user_id": user, "amount": 5}, headers={"Idempotency-Key": "k1"})
    assert first.json() == again.json()
    other = http.post("/credits/add", json={"user_id": user, "amount": 6}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409
    assert http.post("/credits/add", json={"user_id": user, "amount": -1}).status_code == 422


def test_corrections_answer_with_their_entries_and_refusals_with_their_status(http: TestClient) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    lot_id = http.post("/credits/add", json={"user_id": user, "amount": 100}).json()["lot_id"]
    charge = http.post("/credits/deduct", json={"user_id": user, "amount": 30}).json()
    refund = http.post(f"/credits/entries/{charge['id']}/refund", json={"reason": "failed", "amount": 10})
    assert refund.status_code == 200, refund.text
    assert (refund.json()["kind"], refund.json()["balance_after"]) == ("refund", 80)
    moved = http.post(f"/credits/lots/{lot_id}/expiry", json={"expires_at": "2099-01-01T00:00:00Z"})
    assert moved.status_code == 200 and moved.json()["kind"] == "expiry_changed"
    voided = http.post(f"/credits/lots/{lot_id}/void", json={"reason": "chargeback", "amount": 5},
                       headers={"Idempotency-Key": "void-1"})
    assert voided.status_code == 200 and voided.json()["balance_after"] == 75
    again = http.post(f"/credits/lots/{lot_id}/void", json={"reason": "chargeback", "amount": 5},
                      headers={"Idempotency-Key": "void-1"})
    assert again.json() == voided.json()
    assert http.post(f"/credits/lots/{lot_id}/void", json={"reason": "x", "amount": 76}).status_code == 402
    assert http.post("/credits/lots/999999/void", json={"reason": "x"}).json()["error"]["code"] == "unknown_lot"
    assert http.post("/credits/entries/999999/refund", json={"reason": "x"}).status_code == 404
    too_much = http.post(f"/credits/entries/{charge['id']}/refund", json={"reason": "x", "amount": 21})
    assert too_much.status_code == 422
    assert http.post(f"/credits/lots/{lot_id}/void", json={"reason": ""}).status_code == 422
    assert http.get(f"/credits/balance/{user}").json()["total"] == 75


def test_a_low_threshold_per_credit_type_is_set_and_bad_ones_refused(http: TestClient) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    http.post("/credits/add", json={"user_id": user, "amount": 400, "credit_type": "tokens"})
    set_to = http.put(f"/credits/thresholds/{user}", json={"percent": 10, "credit_type": "tokens"})
    assert set_to.status_code == 200, set_to.text
    assert set_to.json() == {"user_id": user, "credit_type": "tokens", "threshold": 40, "percent": 10}
    absolute = http.put(f"/credits/thresholds/{user}", json={"threshold": 7}, headers={"Idempotency-Key": "t-1"})
    assert absolute.json() == {"user_id": user, "credit_type": "credits", "threshold": 7, "percent": None}
    conflict = http.put(f"/credits/thresholds/{user}", json={"threshold": 8}, headers={"Idempotency-Key": "t-1"})
    assert conflict.status_code == 409
    both = http.put(f"/credits/thresholds/{user}", json={"threshold": 5, "percent": 5, "credit_type": "tokens"})
    assert both.status_code == 422 and both.json()["error"]["code"] == "invalid_input"
    assert http.put(f"/credits/thresholds/{user}", json={"percent": 101}).status_code == 422
    assert http.put(f"/credits/thresholds/{user}", json={"credit_type": "a b"}).status_code == 422
    assert http.put("/credits/thresholds/nobody-here", json={"threshold": 1}).status_code == 404
    http.post("/credits/deduct", json={"user_id": user, "amount": 365, "credit_type": "tokens"})
    assert http.get(f"/credits/balance/{user}", params={"credit_type": "tokens"}).json()["available"] == 35


def test_plans_and_subscriptions_answer_with_their_results(http: TestClient) -> None:
    name = f"pro-{uuid.uuid4().hex[:6]}"
    created = http.post("/credits/plans", json={"name": name, "credit_limit": 1000, "price": "19.90"})
    assert created.status_code == 201, created.text
    assert http.get(f"/credits/plans/{name}").json()["credit_limit"] == 1000
    assert http.patch(f"/credits/plans/{name}", json={"credit_limit": 1200}).json()["credit_limit"] == 1200
    assert name in [plan["name"] for plan in http.get("/credits/plans").json()]

    user = f"u-{uuid.uuid4().hex[:8]}"
    assigned = http.put(f"/credits/subscriptions/{user}", json={"plan": name})
    assert assigned.status_code == 200 and assigned.json()["status"] == "active"
    assert http.get(f"/credits/balance/{user}").json()["total"] == 1200
    assert http.get(f"/credits/subscriptions/{user}").json()["plan_id"] == created.json()["id"]
    ended = http.delete(f"/credits/subscriptions/{user}", params={"at_period_end": "false"})
    assert ended.status_code == 200 and ended.json()["status"] != "active"

    spare = f"spare-{uuid.uuid4().hex[:6]}"
    http.post("/credits/plans", json={"name": spare, "credit_limit": 1, "price": "1"})
    assert http.delete(f"/credits/plans/{spare}").json() == {"deleted": spare}
    assert http.get(f"/credits/plans/{spare}").status_code == 404


def test_the_worker_mode_reads_from_the_configured_database_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDITWORKER_DATABASE_URL", f"sqlite:///{tmp_path / 'reads.db'}")
    get_settings.cache_clear()
    deps.configured_credit_service.cache_clear()
    try:
        CreditService(f"sqlite:///{tmp_path / 'reads.db'}").add_credits("reader", 2)
        app = FastAPI()
        app.include_router(build_router(client=AsyncCreditClient(Settings(broker_url="memory://"))))
        with TestClient(app) as client:
            assert client.get("/credits/balance/reader").json()["total"] == 2
    finally:
        deps.configured_credit_service.cache_clear()
        get_settings.cache_clear()


def test_the_router_alone_uses_the_configured_database_and_makes_its_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDITWORKER_DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    get_settings.cache_clear()
    deps.configured_credit_service.cache_clear()
    try:
        app = FastAPI()
        app.include_router(router)
        with TestClient(app) as client:
            assert client.post("/credits/add", json={"user_id": "a", "amount": 3}).status_code == 200
            assert client.get("/credits/balance/a").json()["total"] == 3
        assert (tmp_path / "app.db").exists()
    finally:
        deps.configured_credit_service.cache_clear()
        get_settings.cache_clear()


def test_the_in_process_router_documents_the_registry_result_models() -> None:
    app = FastAPI()
    app.include_router(router)
    schema = app.openapi()
    for operation in OPERATIONS:
        if operation.route is None:
            continue
        path = operation.route.path.replace(":path", "")
        answers = schema["paths"][path][operation.route.method.lower()]["responses"]
        assert {"200", "201"} & set(answers), operation.task
        assert "202" not in answers  # in process nothing is queued
