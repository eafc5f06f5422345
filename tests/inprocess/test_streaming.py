"""Metering real AI traffic in process, through a real HTTP server and client: streamed
responses, usage reported by the endpoint, rate cards, missing usage, clients that leave.

Each test runs uvicorn in a thread and reads the responses with httpx, streaming where the
response streams, on SQLite and PostgreSQL with the sync and the async engine.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from creditworker import CreditService
from creditworker.contract.credits import EntryKind, LedgerEntry
from tests.inprocess.conftest import KINDS, sync_face
from tests.metering.serving import CARD, Gate, chat, chat_app, served


@pytest.fixture(params=["sync-sqlite", "async-postgres"])
def engine_kind(request: pytest.FixtureRequest) -> str:
    """Two of the four engines for most tests (the suite stays lean); the stream's charge and
    the concurrency bound run on all four."""
    return str(request.param)


@pytest.fixture
def checks(credit_service: Any) -> CreditService:
    return sync_face(credit_service)


@pytest.fixture
def user(checks: CreditService) -> str:
    user_id = f"user-{uuid.uuid4().hex[:10]}"
    checks.add_credits(user_id, 1000)
    return user_id


def headers(user: str, tokens: int = 100) -> dict[str, str]:
    return {"X-User-ID": user, "X-Estimated-Tokens": str(tokens), "X-Request-ID": uuid.uuid4().hex}


def charges(checks: CreditService, user: str) -> list[LedgerEntry]:
    return [e for e in reversed(checks.get_history(user)) if e.kind not in (EntryKind.ADD, EntryKind.RESERVE)]


def settled(checks: CreditService, user: str, count: int = 1) -> list[LedgerEntry]:
    """The user's settling entries once there are `count` (a stream is settled by the server
    after the client stopped reading: waited for, never slept on)."""
    deadline = time.monotonic() + 20
    while True:
        found = charges(checks, user)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def state(checks: CreditService, user: str) -> tuple[int, int]:
    info = checks.get_user_credits_info(user)
    return info.total, info.reserved


def app_with(credit_service: Any, gate: Gate | None = None, **options: Any) -> FastAPI:
    return chat_app(gate, credit_service=credit_service, path_prefix="/v1", **options)


# ------------------------------------------------------------------ streams


@pytest.mark.parametrize("engine_kind", KINDS)
def test_an_openai_stream_passes_through_unbuffered_and_is_charged_its_usage_chunk(
    credit_service: Any, checks: CreditService, user: str
) -> None:
    gate = Gate()
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
             "prompt_tokens_details": {"cached_tokens": 600}}
    with (
        served(app_with(credit_service, gate, rate_card=CARD)) as url, httpx.Client(base_url=url) as http,
        http.stream("POST", "/v1/chat/completions", json=chat(usage=usage),
                    headers=headers(user, 100), timeout=30) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = next(lines)  # the endpoint waits at the gate: only an unbuffered stream gets here
        assert first.startswith("data: ") and "word0" in first
        assert state(checks, user) == (1000, 60)  # 100 tokens held at the highest rate, 0.6
        gate.event.set()
        rest = list(lines)
    assert rest[-2:] == ["data: [DONE]", ""]
    # 400 prompt tokens at 0.15, 600 cached at 0.075, 100 completion at 0.6: 60 + 45 + 60
    (commit,) = settled(checks, user)
    assert (commit.kind, commit.amount) == (EntryKind.COMMIT, -165)
    assert commit.metadata is not None
    assert commit.metadata["response"] == "stream" and commit.metadata["model"] == "gpt-4o-mini"
    assert state(checks, user) == (835, 0)


def test_an_ndjson_stream_is_charged_from_its_last_usage_line(
    credit_service: Any, checks: CreditService, user: str
) -> None:
    with (
        served(app_with(credit_service, rate_card=CARD)) as url, httpx.Client(base_url=url) as http,
        http.stream("POST", "/v1/chat/completions", json=chat(format="ndjson"),
                    headers=headers(user), timeout=30) as response,
    ):
        lines = [line for line in response.iter_lines() if line]
    assert len(lines) == 4 and response.status_code == 200
    (commit,) = settled(checks, user)
    assert commit.amount == -9  # 9 prompt at 0.15 + 12 completion at 0.6 = 8.55, rounded up


@pytest.mark.parametrize(("policy", "charged"), [("release", 0), ("estimate", 60)])
def test_a_stream_without_usage_follows_the_missing_usage_policy(
    credit_service: Any, checks: CreditService, user: str, policy: str, charged: int
) -> None:
    app = app_with(credit_service, rate_card=CARD, on_missing_usage=policy)
    with served(app) as url, httpx.Client(base_url=url) as http:
        body = chat(stream_options={"include_usage": False})
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers(user), timeout=30) as r:
            assert len([line for line in r.iter_lines() if line]) == 4
    (entry,) = settled(checks, user)
    assert entry.kind == (EntryKind.RELEASE if policy == "release" else EntryKind.COMMIT)
    assert state(checks, user) == (1000 - charged, 0)


@pytest.mark.parametrize(("policy", "charged"), [("release", 9), ("estimate", 9)])
def test_a_client_that_leaves_mid_stream_is_charged_the_usage_reported_so_far(
    credit_service: Any, checks: CreditService, user: str, policy: str, charged: int
) -> None:
    app = app_with(credit_service, rate_card=CARD, on_missing_usage=policy)
    with (
        served(app) as url, httpx.Client(base_url=url) as http,
        http.stream("POST", "/v1/chat/completions", json=chat(hang=400),
                    headers=headers(user), timeout=30) as response,
    ):
        for line in response.iter_lines():
            if '"usage": {' in line:
                break  # the usage event came; the stream goes on for 20 s: leave now
        response.close()
        (entry,) = settled(checks, user)
    assert entry.kind == EntryKind.COMMIT and entry.amount == -charged
    assert entry.metadata is not None and entry.metadata["cut_short"] is True
    assert app.state.generated < 400


@pytest.mark.parametrize(("policy", "kind", "charged"),
                         [("release", EntryKind.RELEASE, 0), ("estimate", EntryKind.COMMIT, 60)])
def test_a_client_that_leaves_before_any_usage_gets_the_policy(
    credit_service: Any, checks: CreditService, user: str, policy: str, kind: EntryKind, charged: int
) -> None:
    app = app_with(credit_service, rate_card=CARD, on_missing_usage=policy)
    with served(app) as url, httpx.Client(base_url=url) as http:
        body = chat(hang=400, stream_options={"include_usage": False})
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers(user), timeout=30) as r:
            next(r.iter_lines())
        (entry,) = settled(checks, user)
    assert entry.kind == kind and state(checks, user) == (1000 - charged, 0)


def test_a_stream_whose_usage_the_user_cannot_pay_is_charged_its_hold_never_free(
    credit_service: Any, checks: CreditService, caplog: pytest.LogCaptureFixture
) -> None:
    user = f"user-{uuid.uuid4().hex[:10]}"
    checks.add_credits(user, 100)
    usage = {"prompt_tokens": 10, "completion_tokens": 1000}  # 601.5 credits: far above the 100
    with (
        served(app_with(credit_service, rate_card=CARD)) as url, httpx.Client(base_url=url) as http,
        caplog.at_level(logging.ERROR),
        http.stream("POST", "/v1/chat/completions", json=chat(usage=usage), headers=headers(user),
                    timeout=30) as response,
    ):
        assert response.status_code == 200 and len([line for line in response.iter_lines() if line]) == 5
    (commit,) = settled(checks, user)
    assert commit.kind == EntryKind.COMMIT and commit.amount == -60  # the hold: 100 tokens at 0.6
    assert state(checks, user) == (40, 0)
    assert "charging its hold" in caplog.text


# ------------------------------------------------------------------ where usage comes from


@pytest.mark.parametrize(("state_usage", "charged"), [
    (40, 40),  # credits, charged as they are
    ("40.2", 41),
    ({"prompt_tokens": 100, "completion_tokens": 100}, 75),  # priced: 15 + 60
])
def test_usage_the_endpoint_puts_in_request_state_wins_over_the_body(
    credit_service: Any, checks: CreditService, user: str, state_usage: Any, charged: int
) -> None:
    with served(app_with(credit_service, rate_card=CARD)) as url, httpx.Client(base_url=url) as http:
        response = http.post("/v1/chat/completions", json=chat(stream=False, state_usage=state_usage),
                             headers=headers(user))
    assert response.status_code == 200
    assert response.headers["X-Credits-Deducted"] == str(charged)
    (commit,) = charges(checks, user)
    assert commit.amount == -charged and commit.metadata is not None
    assert commit.metadata["usage_from"] == "endpoint" and commit.metadata["response"] == "json"


def test_the_model_comes_from_the_response_then_the_request_then_the_default(
    credit_service: Any, checks: CreditService, user: str
) -> None:
    card = {**CARD, "default": {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}}
    usage = {"prompt_tokens": 10, "completion_tokens": 10}
    with served(app_with(credit_service, rate_card=card)) as url, httpx.Client(base_url=url) as http:
        answered = [
            http.post("/v1/chat/completions", json=chat(model, stream=False, usage=usage, **knobs),
                      headers=headers(user, 10)).headers["X-Credits-Deducted"]
            for model, knobs in [
                ("gpt-4o-mini", {"answer_model": "big-model"}),  # 25 + 100: the response's model
                ("gpt-4o-mini", {"answer_model": "gpt-4o-mini-2024-07-18"}),  # unknown: the request's
                ("some-new-model", {}),  # neither: default
            ]
        ]
    assert answered == ["125", "8", "20"]


def test_an_unknown_model_without_default_is_500_before_the_endpoint_runs(
    credit_service: Any, checks: CreditService, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_with(credit_service, rate_card=CARD)
    with served(app) as url, httpx.Client(base_url=url) as http, caplog.at_level(logging.ERROR):
        response = http.post("/v1/chat/completions", json=chat("gpt-9", stream=False), headers=headers(user))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "unpriced_model"
    assert "'gpt-9'" in caplog.text and "no price" in caplog.text
    assert state(checks, user) == (1000, 0) and charges(checks, user) == []


@pytest.mark.parametrize(("usage", "charged"), [
    (12, 12), (12.0, 12), ("12", 12), (1e3, 1000), ("1e3", 1000), (12.5, 13), ("0.01", 1),
])
def test_a_usage_in_any_json_number_form_is_charged_rounded_up(
    credit_service: Any, checks: CreditService, user: str, usage: Any, charged: int
) -> None:
    app = app_with(credit_service)
    with served(app) as url, httpx.Client(base_url=url) as http:
        response = http.post("/v1/chat/completions", json=chat(stream=False, usage={"total_tokens": usage}),
                             headers=headers(user, 5))
    assert response.headers["X-Credits-Deducted"] == str(charged)
    assert state(checks, user) == (1000 - charged, 0)


@pytest.mark.parametrize(("usage", "policy"), [
    (-5, "release"), (True, "estimate"), ([12], "release"), ("many", "estimate"), (None, "release"),
    ({"total_tokens": {"n": 1}}, "estimate"), ("nan", "release"),
])
def test_a_usage_that_is_not_a_count_is_logged_and_follows_the_policy(
    credit_service: Any, checks: CreditService, user: str, usage: Any, policy: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body_usage = usage if isinstance(usage, dict) else {"total_tokens": usage}
    app = app_with(credit_service, on_missing_usage=policy)
    with served(app) as url, httpx.Client(base_url=url) as http, caplog.at_level(logging.WARNING):
        response = http.post("/v1/chat/completions", json=chat(stream=False, usage=body_usage),
                             headers=headers(user, 5))
    assert response.status_code == 200
    charged = 0 if policy == "release" else 5
    assert response.headers["X-Credits-Deducted"] == str(charged)
    assert state(checks, user) == (1000 - charged, 0)
    if usage is not None:
        assert "unusable usage" in caplog.text


def test_a_token_kind_the_card_does_not_price_is_logged_and_never_free_with_estimate(
    credit_service: Any, checks: CreditService, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_with(credit_service, rate_card=CARD, on_missing_usage="estimate")
    usage = {"prompt_tokens": 10, "completion_tokens": 10, "image_tokens": 5}
    with served(app) as url, httpx.Client(base_url=url) as http, caplog.at_level(logging.WARNING):
        response = http.post("/v1/chat/completions", json=chat(stream=False, usage=usage), headers=headers(user))
    assert response.headers["X-Credits-Deducted"] == "60"
    assert "image_tokens" in caplog.text


@pytest.mark.parametrize("usage", [10**12 + 1, "1e13", 1e300])
def test_a_usage_above_the_engines_maximum_is_refused_like_an_overage(
    credit_service: Any, checks: CreditService, user: str, usage: Any
) -> None:
    with served(app_with(credit_service)) as url, httpx.Client(base_url=url) as http:
        response = http.post("/v1/chat/completions", json=chat(stream=False, usage={"total_tokens": usage}),
                             headers=headers(user, 5))
    assert response.status_code == 402
    assert state(checks, user) == (1000, 0)


@pytest.mark.parametrize(("policy", "charged"), [("release", 0), ("estimate", 60)])
def test_an_error_response_follows_the_missing_usage_policy(
    credit_service: Any, checks: CreditService, user: str, policy: str, charged: int
) -> None:
    app = app_with(credit_service, rate_card=CARD, on_missing_usage=policy)
    with served(app) as url, httpx.Client(base_url=url) as http:
        response = http.post("/v1/chat/completions", json=chat(stream=False, status=502), headers=headers(user))
    assert response.status_code == 502
    assert state(checks, user) == (1000 - charged, 0)


# ------------------------------------------------------------------ many at once


@pytest.mark.parametrize("engine_kind", KINDS)
def test_concurrent_requests_of_one_user_never_charge_more_than_the_user_had(
    credit_service: Any, checks: CreditService
) -> None:
    user = f"user-{uuid.uuid4().hex[:10]}"
    checks.add_credits(user, 100)
    statuses: list[int] = []
    usage = {"prompt_tokens": 100, "completion_tokens": 100}  # 75 credits: above the 60 held

    def one(http: httpx.Client) -> None:
        response = http.post("/v1/chat/completions", json=chat(stream=False, usage=usage),
                             headers=headers(user, 100), timeout=60)
        statuses.append(response.status_code)

    with served(app_with(credit_service, rate_card=CARD)) as url, httpx.Client(base_url=url) as http:
        run_all(lambda: one(http), 12)
    total, reserved = state(checks, user)
    assert reserved == 0 and total >= 0
    assert statuses.count(200) == (100 - total) // 75 == 1
    assert set(statuses) <= {200, 402}


def test_a_hold_that_outlives_its_ttl_stops_counting_and_the_usage_is_still_charged(
    credit_service: Any, checks: CreditService
) -> None:
    """No beat here: the engine itself frees a hold past its TTL, at the next write."""
    user = f"user-{uuid.uuid4().hex[:10]}"
    checks.add_credits(user, 100)
    app = app_with(credit_service, reservation_ttl_seconds=1)
    with served(app) as url, httpx.Client(base_url=url) as http:
        slow = http.post("/v1/chat/completions", json=chat(stream=False, sleep=1.5, usage={"total_tokens": 10}),
                         headers=headers(user, 90), timeout=30)
        assert slow.status_code == 200 and slow.headers["X-Credits-Deducted"] == "10"
        assert state(checks, user) == (90, 0)
        fast = http.post("/v1/chat/completions", json=chat(stream=False, usage={"total_tokens": 90}),
                         headers=headers(user, 90), timeout=30)
    assert fast.status_code == 200 and state(checks, user) == (0, 0)
    kinds = [e.kind.value for e in reversed(checks.get_history(user))]
    assert kinds == ["add", "reserve", "reservation_expired", "deduct", "reserve", "commit"]


def run_all(call: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
