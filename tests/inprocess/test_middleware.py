"""The metering middleware in process: reserve and commit straight against the database."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.testclient import TestClient

from creditworker import CreditService
from creditworker.contract.credits import EntryKind
from creditworker.http.metering.middleware import CreditDeductionMiddleware
from tests.inprocess.conftest import sync_face


def metered_app(credit_service: Any, calls: Counter[str], **options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(CreditDeductionMiddleware, credit_service=credit_service, **options)

    @app.post("/api/answer")
    async def answer(request: Request) -> dict[str, Any]:
        calls["answer"] += 1
        return {"answer": "42", "usage": {"total_tokens": (await request.json())["tokens"]}}

    @app.post("/api/nested")
    async def nested() -> dict[str, Any]:
        return {"result": {"meta": {"cost": 7}}}

    @app.post("/api/fail")
    async def fail() -> JSONResponse:
        calls["fail"] += 1
        return JSONResponse({"detail": "upstream failed"}, status_code=502)

    @app.get("/api/text")
    async def text() -> PlainTextResponse:
        return PlainTextResponse("plain")

    @app.get("/api/free/ping")
    async def free() -> dict[str, Any]:
        return {"usage": {"total_tokens": 5}}

    @app.get("/apix")
    async def apix() -> dict[str, Any]:
        return {"usage": {"total_tokens": 5}}

    return app


@pytest.fixture
def calls() -> Counter[str]:
    return Counter()


@pytest.fixture
def checks(credit_service: Any) -> CreditService:
    return sync_face(credit_service)


@pytest.fixture
def http(credit_service: Any, calls: Counter[str]) -> Iterator[TestClient]:
    app = metered_app(credit_service, calls, path_prefix="/api", skip_paths=["/api/free"])
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def user(http: TestClient, checks: CreditService) -> str:
    user_id = f"user-{uuid.uuid4().hex[:10]}"
    checks.add_credits(user_id, 100)
    return user_id


def headers(user: str, estimate: int = 50, request_id: str | None = None) -> dict[str, str]:
    return {"X-User-ID": user, "X-Estimated-Tokens": str(estimate),
            "X-Request-ID": request_id or uuid.uuid4().hex}


def kinds(checks: CreditService, user: str) -> list[str]:
    return [e.kind.value for e in reversed(checks.get_history(user)) if e.kind is not EntryKind.ADD]


def balance(checks: CreditService, user: str) -> tuple[int, int]:
    info = checks.get_user_credits_info(user)
    return info.total, info.reserved


def test_the_reported_usage_is_committed_and_shown_in_a_header(
    http: TestClient, checks: CreditService, user: str
) -> None:
    response = http.post("/api/answer", json={"tokens": 23}, headers=headers(user))
    assert response.status_code == 200, response.text
    assert response.json()["answer"] == "42"
    assert response.headers["X-Credits-Deducted"] == "23"
    assert balance(checks, user) == (77, 0)
    assert kinds(checks, user) == ["reserve", "commit"]


def test_a_request_without_a_user_is_401_and_never_runs(http: TestClient, calls: Counter[str]) -> None:
    response = http.post("/api/answer", json={"tokens": 1})
    assert response.status_code == 401
    assert calls["answer"] == 0


def test_an_estimate_the_user_cannot_cover_is_402_and_never_runs(
    http: TestClient, checks: CreditService, user: str, calls: Counter[str]
) -> None:
    response = http.post("/api/answer", json={"tokens": 1}, headers=headers(user, 500))
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert calls["answer"] == 0 and balance(checks, user) == (100, 0)


def test_a_user_without_an_account_is_402(http: TestClient, calls: Counter[str]) -> None:
    response = http.post("/api/answer", json={"tokens": 1}, headers=headers("nobody-" + uuid.uuid4().hex))
    assert response.status_code == 402 and calls["answer"] == 0


def test_usage_the_user_cannot_pay_withholds_the_answer_with_402(
    http: TestClient, checks: CreditService, user: str
) -> None:
    response = http.post("/api/answer", json={"tokens": 150}, headers=headers(user, 10))
    assert response.status_code == 402
    assert balance(checks, user) == (100, 0)


def test_errors_and_non_json_release_the_hold_uncharged(
    http: TestClient, checks: CreditService, user: str
) -> None:
    assert http.post("/api/fail", headers=headers(user)).status_code == 502
    text = http.get("/api/text", headers=headers(user))
    assert text.status_code == 200 and "X-Credits-Deducted" not in text.headers
    assert balance(checks, user) == (100, 0)
    assert kinds(checks, user) == ["reserve", "release", "reserve", "release"]


def test_path_prefix_matches_whole_segments_and_skip_paths_are_free(
    http: TestClient, checks: CreditService, user: str
) -> None:
    assert http.get("/apix").status_code == 200  # no user needed: not metered
    assert http.get("/api/free/ping").status_code == 200
    assert http.post("/api/answer", json={"tokens": 1}).status_code == 401
    assert balance(checks, user) == (100, 0)


def test_the_usage_key_is_a_dotted_path_and_the_estimate_has_a_default(
    credit_service: Any, checks: CreditService, user: str, calls: Counter[str]
) -> None:
    app = metered_app(
        credit_service, calls, path_prefix="/api", response_usage_key="result.meta.cost",
        user_id_header="X-Account", estimated_tokens_header="X-Cost", default_estimated_tokens=9,
    )
    with TestClient(app) as client:
        response = client.post("/api/nested", headers={"X-Account": user})
    assert response.status_code == 200 and response.headers["X-Credits-Deducted"] == "7"
    reserve = checks.get_history(user, kinds=["reserve"])[0]
    assert reserve.held == 9
    assert balance(checks, user) == (93, 0)


def test_a_reused_request_id_is_refused_before_the_endpoint_runs(
    http: TestClient, checks: CreditService, user: str, calls: Counter[str]
) -> None:
    reused = headers(user, 50, "same-id")
    first = http.post("/api/answer", json={"tokens": 23}, headers=reused)
    replays = [http.post("/api/answer", json={"tokens": 23}, headers=reused) for _ in range(3)]
    assert first.status_code == 200 and first.headers["X-Credits-Deducted"] == "23"
    assert [r.status_code for r in replays] == [409, 409, 409]
    body = replays[0].json()["error"]
    assert body["code"] == "idempotency_conflict" and "same-id" in body["message"]
    assert calls["answer"] == 1
    assert balance(checks, user) == (77, 0)


def test_a_failed_request_id_is_refused_too_so_a_retry_sends_a_new_one(
    http: TestClient, checks: CreditService, user: str, calls: Counter[str]
) -> None:
    reused = headers(user, 50, "failing-id")
    assert http.post("/api/fail", headers=reused).status_code == 502
    assert http.post("/api/fail", headers=reused).status_code == 409
    assert calls["fail"] == 1 and balance(checks, user) == (100, 0)


def test_request_ids_are_scoped_per_user(
    http: TestClient, checks: CreditService, user: str, calls: Counter[str]
) -> None:
    other = f"other-{uuid.uuid4().hex[:8]}"
    checks.add_credits(other, 100)
    mine = http.post("/api/answer", json={"tokens": 5}, headers=headers(user, 10, "shared-id"))
    theirs = http.post("/api/answer", json={"tokens": 6}, headers=headers(other, 10, "shared-id"))
    assert mine.status_code == theirs.status_code == 200
    assert balance(checks, user) == (95, 0) and balance(checks, other) == (94, 0)


def test_exactly_one_of_credit_service_and_client_is_given(credit_service: Any) -> None:
    app = FastAPI()
    app.add_middleware(CreditDeductionMiddleware)
    with pytest.raises(TypeError, match="exactly one"), TestClient(app) as client:
        client.get("/")


def test_a_database_that_does_not_answer_is_503_and_the_endpoint_never_runs(calls: Counter[str]) -> None:
    closed = CreditService("postgresql+psycopg2://postgres@127.0.0.1:1/closed")
    app = metered_app(closed, calls, path_prefix="/api")
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/api/answer", json={"tokens": 1}, headers=headers("anyone"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert calls["answer"] == 0
