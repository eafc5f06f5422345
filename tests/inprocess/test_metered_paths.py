"""Paths as the app sees them: mounted under a prefix, served with `--root-path`, or both,
the middleware meters `path_prefix` and skips `skip_paths` below the app's `root_path`."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from creditworker import CreditService
from tests.inprocess.conftest import sync_face
from tests.metering.serving import chat, chat_app, served


@pytest.fixture(params=["sync-sqlite", "async-postgres"])
def engine_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def metered(credit_service: Any) -> FastAPI:
    app = chat_app(credit_service=credit_service, path_prefix="/v1", skip_paths=["/v1/free"])

    @app.get("/v1/free")
    async def free() -> dict[str, Any]:
        return {"usage": {"total_tokens": 5}}

    return app


@pytest.mark.parametrize(("mount", "root_path"), [("/svc", ""), ("", "/svc"), ("/svc", "/proxy")])
def test_a_mounted_or_root_pathed_app_meters_below_its_root_path(
    credit_service: Any, mount: str, root_path: str
) -> None:
    checks: CreditService = sync_face(credit_service)
    user = f"user-{uuid.uuid4().hex[:10]}"
    checks.add_credits(user, 100)
    app = metered(credit_service)
    if mount:
        outer = FastAPI()
        outer.mount(mount, app)
        app = outer
    body = chat(stream=False, usage={"total_tokens": 7})
    with served(app, root_path=root_path) as url, httpx.Client(base_url=url + mount) as http:
        anonymous = http.post("/v1/chat/completions", json=body)
        paid = http.post("/v1/chat/completions", json=body, headers={"X-User-ID": user})
        free = http.get("/v1/free")
    assert anonymous.status_code == 401
    assert paid.status_code == 200 and paid.headers["X-Credits-Deducted"] == "7"
    assert free.status_code == 200 and "X-Credits-Deducted" not in free.headers
    assert checks.get_user_credits_info(user).total == 93
