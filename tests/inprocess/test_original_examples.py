"""The original credit-management module's README examples, with only their imports (and the
engine's one-line construction) changed: the router, the middleware with `credit_service=`,
and the async service."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from creditworker.http.api import deps
from creditworker.settings import get_settings


@pytest.fixture
def configured_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The database the router finds in the settings (CREDITWORKER_DATABASE_URL)."""
    path = tmp_path / "credits.db"
    monkeypatch.setenv("CREDITWORKER_DATABASE_URL", f"sqlite:///{path}")
    get_settings.cache_clear()
    deps.configured_credit_service.cache_clear()
    yield path
    deps.configured_credit_service.cache_clear()
    get_settings.cache_clear()


def test_mount_the_router_and_use_the_http_api(configured_database: Path) -> None:
    # --- the README, with the import changed
    from creditworker.http import router as credit_router

    app = FastAPI()
    app.include_router(credit_router)  # prefix is /credits
    # ---
    with TestClient(app) as http:
        added = http.post("/credits/add", json={"user_id": "user-1", "amount": 100,
                                                "description": "Welcome bonus"})
        assert added.status_code == 200, added.text
        assert http.get("/credits/balance/user-1").json()["available"] == 100
        assert http.post("/credits/deduct", json={"user_id": "user-1", "amount": 30}).status_code == 200
        assert http.get("/credits/balance/user-1").json()["available"] == 70
        plan = http.post("/credits/plans", json={
            "name": "Pro", "credit_limit": 500, "price": 9.99, "billing_period": "monthly",
            "validity_days": 30,
        })
        assert plan.status_code == 201, plan.text
        assert plan.json()["price"] in ("9.99", "9.9900")


@pytest.mark.parametrize("flavour", ["async", "sync"])
def test_the_automatic_credit_deduction_middleware(flavour: str) -> None:
    # --- the README, with the imports and the engine's construction changed
    from creditworker import AsyncCreditService, CreditService
    from creditworker.http import CreditDeductionMiddleware

    app = FastAPI()
    credit_service = AsyncCreditService("sqlite://") if flavour == "async" else CreditService("sqlite://")

    app.add_middleware(
        CreditDeductionMiddleware,
        credit_service=credit_service,
        path_prefix="/api",                    # only /api/* routes
        user_id_header="X-User-Id",
        estimated_tokens_header="X-Estimated-Tokens",
        default_estimated_tokens=100,
        response_usage_key="total_token",     # or "usage.total_tokens" for OpenAI-style
        skip_paths=("/api/health",),
    )
    # ---

    @app.post("/api/chat")
    async def chat() -> dict[str, object]:
        return {"message": "hello", "total_token": 42}

    @app.get("/api/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    with TestClient(app) as http:
        assert http.post("/credits/none").status_code == 404  # not metered, not mounted
        http.portal.call(_grant, credit_service, "user-1", 500)  # type: ignore[union-attr]
        response = http.post("/api/chat", headers={"X-User-Id": "user-1"})
        assert response.status_code == 200 and response.headers["X-Credits-Deducted"] == "42"
        assert http.post("/api/chat").status_code == 401
        poor = http.post("/api/chat", headers={"X-User-Id": "user-1", "X-Estimated-Tokens": "1000"})
        assert poor.status_code == 402
        assert http.get("/api/health").status_code == 200
        info = http.portal.call(_info, credit_service, "user-1")  # type: ignore[union-attr]
    assert info.available == 458


async def _grant(service: object, user_id: str, amount: int) -> None:
    from creditworker.http.metering.meters import call_engine

    await call_engine(service.add_credits, user_id, amount)


async def _info(service: object, user_id: str) -> object:
    from creditworker.http.metering.meters import call_engine

    return await call_engine(service.get_user_credits_info, user_id)


def test_use_the_services_directly_async(tmp_path: Path) -> None:
    # --- the README's quick start, with the imports and the construction changed
    from creditworker import AsyncCreditService as CreditService
    from creditworker import AsyncSubscriptionService as SubscriptionService

    async def main() -> tuple[int, int, int]:
        credit_svc = CreditService("sqlite://", ledger_path=str(tmp_path / "credit_ledger.jsonl"))
        sub_svc = SubscriptionService(credit_svc)

        await credit_svc.add_credits("user-1", 100, description="Sign-up bonus")
        before = (await credit_svc.get_user_credits_info("user-1")).available

        await credit_svc.deduct_credits("user-1", 30, description="Used for service X")
        after = (await credit_svc.get_user_credits_info("user-1")).available
        plan = await sub_svc.create_plan(f"pro-{uuid.uuid4().hex[:4]}", credit_limit=500)
        await sub_svc.assign_plan("user-1", plan.id)
        with_plan = (await credit_svc.get_user_credits_info("user-1")).available
        await credit_svc.dispose()
        return before, after, with_plan

    assert asyncio.run(main()) == (100, 70, 570)
    assert (tmp_path / "credit_ledger.jsonl").read_text().count('"add"') >= 1
