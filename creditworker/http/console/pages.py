"""How the console answers: a page from its templates with the security headers, a redirect
after a form, or an error page for a refused request."""

from __future__ import annotations

import secrets
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from creditworker.engine.results import decimal_text
from creditworker.http.console.access import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SESSION_SECONDS,
    csrf_token,
    set_cookie,
)

HERE = Path(__file__).parent

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    # Scripts, styles and images from the console's own files only; never framed.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

DONE = {
    "grant": "Credits granted.", "adjust": "Balance adjusted.", "release": "Hold released.",
    "threshold": "Low-credit threshold set.", "plan": "Plan set.",
    "plan-created": "Plan created.", "plan-updated": "Plan updated.", "audit": "Audit finished.",
    "void": "Grant voided.", "refund": "Charge refunded.", "expiry": "Expiry changed.",
    "topup-set": "Auto top-up rule set.", "topup-remove": "Auto top-up rule removed.",
}
"""The notice a page shows after an action redirected to it with `done=<name>`."""


class Refused(Exception):
    """A request the console answers with an error page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Pages:
    """The console's templates, rendered with what every page needs (base path, CSRF token,
    operator) and the security headers."""

    def __init__(self, *, open_console: bool) -> None:
        self.open_console = open_console
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        filters = self.templates.env.filters
        filters["when"] = lambda moment: (
            moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else ""
        )
        filters["q"] = lambda value: quote(str(value), safe="")
        filters["count"] = lambda value: f"{int(value):,}"
        filters["money"] = lambda amount, currency: f"{decimal_text(amount)} {currency}"

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> Response:
        token, new = csrf_token(request)
        response = self.templates.TemplateResponse(
            request, template,
            {"base": request.scope.get("root_path", ""), "csrf_field": CSRF_FIELD,
             "csrf": token, "operator": getattr(request.state, "operator", None),
             "open_console": self.open_console,
             "new_token": lambda: secrets.token_urlsafe(16), **context},
            status_code=status,
        )
        if new:
            set_cookie(request, response, CSRF_COOKIE, token, SESSION_SECONDS)
        response.headers.update(SECURITY_HEADERS)
        return response


def redirect(request: Request, path: str, **params: Any) -> RedirectResponse:
    """303 to a console path (behind its mount), with the non-None `params` as the query."""
    query = urlencode({name: value for name, value in params.items() if value is not None})
    target = f"{request.scope.get('root_path', '')}{path}" + (f"?{query}" if query else "")
    return RedirectResponse(target, status_code=303)
