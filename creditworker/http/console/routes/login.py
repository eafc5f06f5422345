"""Log in with an API key (a signed session cookie), and log out."""

from __future__ import annotations

import asyncio
import math

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from creditworker.http.console.access import SESSION_COOKIE, SESSION_SECONDS, set_cookie
from creditworker.http.console.deps import ConsoleDep, console_of
from creditworker.http.console.forms import posted_form
from creditworker.http.console.pages import redirect

router = APIRouter()


@router.get("/login")
async def login_page(request: Request, console: ConsoleDep, next: str = "/") -> Response:
    if request.state.operator is not None:
        return redirect(request, _safe_next(next))
    return console.pages.render(request, "login.html", next=_safe_next(next),
                                closed=console.access.closed_reason())


@router.post("/login")
async def login(request: Request, console: ConsoleDep) -> Response:
    fields = await posted_form(request)
    throttle = console.access.throttle
    client = request.client.host if request.client else "unknown"
    wait = throttle.wait_seconds(client)
    if wait > 0:
        seconds = math.ceil(wait)
        response = console.pages.render(
            request, "login.html", 429, next=_safe_next(fields.get("next", "/")),
            closed=console.access.closed_reason(),
            throttled=f"Too many failed logins from your address: try again in {seconds} s.",
        )
        response.headers["Retry-After"] = str(seconds)
        return response
    session = console.access.login(fields.get("api_key", ""))
    if session is None:
        await asyncio.sleep(throttle.failed(client))
        return console.pages.render(
            request, "login.html", 401, next=_safe_next(fields.get("next", "/")),
            closed=console.access.closed_reason(), failed=True,
        )
    throttle.succeeded(client)
    response = redirect(request, _safe_next(fields.get("next", "/")))
    set_cookie(request, response, SESSION_COOKIE, session, SESSION_SECONDS)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    await posted_form(request)
    console_of(request).access.logout(request.cookies.get(SESSION_COOKIE))
    response = redirect(request, "/login")
    response.delete_cookie(SESSION_COOKIE, path=request.scope.get("root_path") or "/")
    return response


def _safe_next(target: str) -> str:
    """Only a path inside the console: never another site (`//host`, `https://...`)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
