"""Reserve-then-deduct metering against a real worker on Redis and PostgreSQL."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.testclient import TestClient

from creditworker.contract.credits import EntryKind, LedgerEntry
from creditworker.http.metering.middleware import CreditDeductionMiddleware, idempotency_key
from producers.aio import AsyncCreditClient
from tests.e2e.conftest import RunningWorker
from tests.metering.serving import CARD, Gate, chat, chat_app, served

pytestmark = pytest.mark.e2e

REDIS_DB = 8
"""Redis database of this module's broker (the `worker` fixture in conftest reads it): 10 to 15
belong to other tests and the benchmarks."""



def metered_app(client: AsyncCreditClient, calls: Counter[str], **options: Any) -> FastAPI:
    """Endpoints that answer with usage, without it, with errors, and with plain text."""
    app = FastAPI()
    app.add_middleware(
        CreditDeductionMiddleware,
        client=client,
        path_prefix="/v1/",
        skip_paths=["/v1/free"],
        **options,
    )

    @app.post("/v1/answer")
    async def answer(request: Request) -> dict[str, Any]:
        calls["answer"] += 1
        tokens = (await request.json())["tokens"]
        return {"answer": "42", "usage": {"total_tokens": tokens}}

    @app.post("/v1/no-usage")
    async def no_usage() -> dict[str, Any]:
        return {"answer": "42"}

    @app.post("/v1/fail")
    async def fail() -> JSONResponse:
        return JSONResponse({"detail": "upstream model failed"}, status_code=502)

    @app.post("/v1/crash")
    async def crash() -> None:
        raise RuntimeError("bug in the endpoint")

    @app.get("/v1/text")
    async def text() -> PlainTextResponse:
        return PlainTextResponse("plain words")

    @app.post("/v1/flaky")
    async def flaky(request: Request) -> Any:
        """Fails the first attempt of each request id, answers the second."""
        request_id = request.headers["X-Request-ID"]
        calls[f"flaky:{request_id}"] += 1
        if calls[f"flaky:{request_id}"] == 1:
            return JSONResponse({"detail": "try again"}, status_code=503)
        return {"answer": "42", "usage": {"total_tokens": 10}}

    @app.get("/v1/free")
    async def free() -> dict[str, Any]:
        return {"usage": {"total_tokens": 5}}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


@pytest.fixture(scope="module")
def client(worker: RunningWorker) -> AsyncCreditClient:
    return AsyncCreditClient(worker.settings)


@pytest.fixture
def calls() -> Counter[str]:
    return Counter()


@pytest.fixture
def http(client: AsyncCreditClient, calls: Counter[str]) -> TestClient:
    return TestClient(metered_app(client, calls), raise_server_exceptions=False)


@pytest.fixture
def user(worker: RunningWorker) -> str:
    """A user holding 100 credits."""
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    worker.client.add_credits(user_id, 100).get()
    return user_id


def headers(user: str, estimate: int = 50, request_id: str | None = None) -> dict[str, str]:
    return {
        "X-User-ID": user,
        "X-Estimated-Tokens": str(estimate),
        "X-Request-ID": request_id or uuid.uuid4().hex,
    }


def entries(worker: RunningWorker, user: str) -> list[LedgerEntry]:
    """The user's ledger after the grant, oldest first."""
    return [e for e in reversed(worker.service.get_history(user)) if e.kind is not EntryKind.ADD]


def kinds(worker: RunningWorker, user: str) -> list[str]:
    return [e.kind.value for e in entries(worker, user)]


def balance(worker: RunningWorker, user: str) -> tuple[int, int]:
    info = worker.service.get_user_credits_info(user)
    return info.total, info.reserved


# ------------------------------------------------------------------ charging


def test_the_reported_usage_is_committed_and_shown_in_a_header(
    http: TestClient, worker: RunningWorker, user: str
) -> None:
    response = http.post(
        "/v1/answer", json={"tokens": 23}, headers=headers(user, 50, "req-commit-" + user)
    )
    assert response.status_code == 200 and response.json()["answer"] == "42"
    assert response.headers["X-Credits-Deducted"] == "23"
    assert balance(worker, user) == (77, 0)
    reserve, commit = entries(worker, user)
    assert reserve.metadata is not None and reserve.metadata["request_id"] == "req-commit-" + user
    assert (reserve.kind, reserve.held, reserve.idempotency_key) == (
        EntryKind.RESERVE,
        50,
        idempotency_key(user, "req-commit-" + user, "reserve"),
    )
    assert (commit.kind, commit.amount, commit.idempotency_key) == (
        EntryKind.COMMIT,
        -23,
        idempotency_key(user, "req-commit-" + user, "commit"),
    )


def test_usage_above_the_estimate_is_charged_when_the_user_can_pay(
    http: TestClient, worker: RunningWorker, user: str
) -> None:
    response = http.post("/v1/answer", json={"tokens": 30}, headers=headers(user, estimate=5))
    assert response.headers["X-Credits-Deducted"] == "30"
    assert balance(worker, user) == (70, 0)


def test_usage_the_user_cannot_pay_withholds_the_answer_with_402(
    http: TestClient, worker: RunningWorker, user: str
) -> None:
    response = http.post("/v1/answer", json={"tokens": 150}, headers=headers(user, estimate=5))
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert balance(worker, user) == (100, 0)
    assert kinds(worker, user) == ["reserve", "release"]


def test_the_default_estimate_applies_without_the_header(
    http: TestClient, worker: RunningWorker, user: str
) -> None:
    response = http.post("/v1/answer", json={"tokens": 3}, headers={"X-User-ID": user})
    assert response.headers["X-Credits-Deducted"] == "3"
    assert entries(worker, user)[0].held == 1


# ------------------------------------------------------------------ releasing


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("post", "/v1/fail", 502),
        ("post", "/v1/crash", 500),
        ("get", "/v1/text", 200),
    ],
)
def test_errors_exceptions_and_non_json_release_the_hold_and_pass_through(
    http: TestClient, worker: RunningWorker, user: str, method: str, path: str, status: int
) -> None:
    response = http.request(method.upper(), path, headers=headers(user))
    assert response.status_code == status
    assert "X-Credits-Deducted" not in response.headers
    if path == "/v1/text":
        assert response.text == "plain words"
    if path == "/v1/fail":
        assert response.json() == {"detail": "upstream model failed"}
    assert balance(worker, user) == (100, 0)
    assert kinds(worker, user) == ["reserve", "release"]


@pytest.mark.parametrize(("path", "body"), [("/v1/no-usage", {}), ("/v1/answer", {"tokens": 0})])
def test_a_response_without_usage_releases_the_hold(
    http: TestClient, worker: RunningWorker, user: str, path: str, body: dict[str, Any]
) -> None:
    response = http.post(path, json=body, headers=headers(user))
    assert response.status_code == 200 and response.json()["answer"] == "42"
    assert response.headers["X-Credits-Deducted"] == "0"
    assert balance(worker, user) == (100, 0)
    assert kinds(worker, user) == ["reserve", "release"]


# ------------------------------------------------------------------ refusing before the work


def test_a_request_without_a_user_is_401_and_never_runs(
    http: TestClient, calls: Counter[str]
) -> None:
    response = http.post("/v1/answer", json={"tokens": 1})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert calls["answer"] == 0


def test_an_estimate_the_user_cannot_cover_is_402_and_never_runs(
    http: TestClient, worker: RunningWorker, user: str, calls: Counter[str]
) -> None:
    response = http.post("/v1/answer", json={"tokens": 1}, headers=headers(user, estimate=101))
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert response.json()["error"]["details"]["available"] == 100
    assert calls["answer"] == 0
    assert balance(worker, user) == (100, 0) and kinds(worker, user) == []


def test_a_user_without_an_account_is_402(http: TestClient, calls: Counter[str]) -> None:
    response = http.post(
        "/v1/answer", json={"tokens": 1}, headers=headers(f"nobody-{uuid.uuid4().hex}")
    )
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert calls["answer"] == 0


@pytest.mark.parametrize("estimate", ["many", "0", "-3"])
def test_a_malformed_estimate_is_422(http: TestClient, user: str, estimate: str) -> None:
    response = http.post(
        "/v1/answer",
        json={"tokens": 1},
        headers={"X-User-ID": user, "X-Estimated-Tokens": estimate},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


def test_a_worker_system_that_does_not_answer_is_503(
    worker: RunningWorker, calls: Counter[str]
) -> None:
    unreachable = AsyncCreditClient(
        worker.settings.model_copy(
            update={
                "broker_url": "redis://127.0.0.1:1/0",
                "result_backend": worker.result_backend,
            }
        )
    )
    response = TestClient(metered_app(unreachable, calls)).post(
        "/v1/answer", json={"tokens": 1}, headers=headers("alice")
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert calls["answer"] == 0


def test_skipped_paths_and_other_prefixes_are_not_metered(http: TestClient) -> None:
    assert http.get("/v1/free").json() == {"usage": {"total_tokens": 5}}
    assert http.get("/health").json() == {"status": "ok"}
    assert "X-Credits-Deducted" not in http.get("/v1/free").headers


def test_the_user_can_come_from_a_callable(
    client: AsyncCreditClient, worker: RunningWorker, user: str, calls: Counter[str]
) -> None:
    app = metered_app(client, calls, user_id_from=lambda request: request.query_params.get("as"))
    response = TestClient(app).post(f"/v1/answer?as={user}", json={"tokens": 7})
    assert response.headers["X-Credits-Deducted"] == "7"
    assert balance(worker, user) == (93, 0)


# ------------------------------------------------------------------ retries


def test_a_reused_request_id_is_refused_before_the_endpoint_runs(
    http: TestClient, worker: RunningWorker, user: str, calls: Counter[str]
) -> None:
    reused = headers(user, 50, f"retry-{user}")
    first = http.post("/v1/answer", json={"tokens": 23}, headers=reused)
    again = http.post("/v1/answer", json={"tokens": 23}, headers=reused)

    assert first.status_code == 200 and first.headers["X-Credits-Deducted"] == "23"
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "idempotency_conflict"
    assert calls["answer"] == 1
    assert balance(worker, user) == (77, 0)
    assert kinds(worker, user) == ["reserve", "commit"]


def test_a_failed_request_id_is_refused_too_and_a_new_id_is_charged_once(
    http: TestClient, worker: RunningWorker, user: str, calls: Counter[str]
) -> None:
    failing = headers(user, 50, f"flaky-{user}")
    assert http.post("/v1/flaky", headers=failing).status_code == 503
    assert http.post("/v1/flaky", headers=failing).status_code == 409
    assert calls[f"flaky:flaky-{user}"] == 1 and balance(worker, user) == (100, 0)


def test_request_ids_are_scoped_per_user(http: TestClient, worker: RunningWorker, user: str) -> None:
    other = f"other-{uuid.uuid4().hex[:12]}"
    worker.client.add_credits(other, 100).get()
    mine = http.post("/v1/answer", json={"tokens": 5}, headers=headers(user, 10, "shared-id"))
    theirs = http.post("/v1/answer", json={"tokens": 6}, headers=headers(other, 10, "shared-id"))
    assert mine.status_code == theirs.status_code == 200
    assert balance(worker, user) == (95, 0) and balance(worker, other) == (94, 0)

# ------------------------------------------------------------------ streamed AI traffic


def test_an_openai_stream_through_the_workers_is_charged_exactly_its_usage_chunk(
    worker: RunningWorker, user: str
) -> None:
    """A real server and a streaming client: the chunks come before the charge, and the
    charge is exactly what the usage chunk costs on the rate card."""
    gate = Gate()
    usage = {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60,
             "prompt_tokens_details": {"cached_tokens": 20}}
    app = chat_app(gate, client=AsyncCreditClient(worker.settings), path_prefix="/v1", rate_card=CARD)
    with (
        served(app) as url, httpx.Client(base_url=url) as http,
        http.stream("POST", "/v1/chat/completions", json=chat(usage=usage),
                    headers=headers(user, 20), timeout=60) as response,
    ):
        lines = response.iter_lines()
        assert "word0" in next(lines)  # unbuffered: the endpoint waits at the gate
        assert balance(worker, user) == (100, 12)  # 20 tokens at the highest rate, 0.6
        gate.event.set()
        assert [line for line in lines if line][-1] == "data: [DONE]"
    # 20 prompt at 0.15 + 20 cached at 0.075 + 20 completion at 0.6 = 16.5: 17 credits
    _reserve, commit = entries(worker, user)
    assert (commit.kind, commit.amount) == (EntryKind.COMMIT, -17)
    assert commit.metadata is not None and commit.metadata["response"] == "stream"
    assert balance(worker, user) == (83, 0)
