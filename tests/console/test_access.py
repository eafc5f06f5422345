"""Who may use the console, checked on the gateway app in process (no browser needed)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from creditworker.http.api.app import create_app
from creditworker.settings import Settings
from creditworker.storage.database import make_engine
from creditworker.storage.migrate import upgrade

KEY = "access-test-key-0123456789"


def client(tmp_path: Path, *, api_keys: str = "", broker_url: str = "filesystem://") -> TestClient:
    tmp_path.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{tmp_path / 'creditworker.db'}"
    upgrade(make_engine(database_url))
    settings = Settings(
        database_url=database_url, broker_url=broker_url, api_keys=api_keys,
        data_dir=str(tmp_path / ".creditworker"), ledger_path=None,
    )
    return TestClient(create_app(settings), follow_redirects=False)


def test_with_no_keys_the_console_is_open_on_the_embedded_broker_only(tmp_path: Path) -> None:
    with client(tmp_path / "embedded") as embedded:
        assert embedded.get("/console/").status_code == 200
    with client(tmp_path / "shared", broker_url="redis://127.0.0.1:1/0") as shared:
        assert shared.get("/console/").status_code == 303
        login = shared.get("/console/login")
        assert "no API keys are configured" in login.text
        assert "name=\"api_key\"" not in login.text


def test_login_sets_a_signed_http_only_strict_cookie_scoped_to_the_console(tmp_path: Path) -> None:
    with client(tmp_path, api_keys=KEY) as http:
        form = http.get("/console/login")
        csrf = http.cookies["cw_console_csrf"]
        assert f'value="{csrf}"' in form.text
        refused = http.post("/console/login", data={"api_key": "wrong", "csrf_token": csrf})
        assert refused.status_code == 401 and "cw_console_session" not in refused.headers.get(
            "set-cookie", "")
        answer = http.post("/console/login", data={
            "api_key": KEY, "csrf_token": csrf, "next": "/account?user_id=a"})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/account?user_id=a"
        cookie = answer.headers["set-cookie"]
        assert "cw_console_session=" in cookie and KEY not in cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        assert http.get("/console/").status_code == 200
        # The signature is checked: change one character and the session is gone.
        session = http.cookies["cw_console_session"]
        http.cookies.set("cw_console_session", session[:-1] + ("0" if session[-1] != "0" else "1"),
                         path="/console")
        assert http.get("/console/").status_code == 303


def test_login_never_sends_the_browser_to_another_site(tmp_path: Path) -> None:
    with client(tmp_path, api_keys=KEY) as http:
        http.get("/console/login")
        csrf = http.cookies["cw_console_csrf"]
        for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
            answer = http.post("/console/login", data={
                "api_key": KEY, "csrf_token": csrf, "next": target})
            assert answer.headers["location"] == "/console/", target


def test_a_form_posted_from_another_origin_is_refused(tmp_path: Path) -> None:
    with client(tmp_path, api_keys=KEY) as http:
        http.get("/console/login")
        csrf = http.cookies["cw_console_csrf"]
        answer = http.post("/console/login", data={"api_key": KEY, "csrf_token": csrf},
                           headers={"Origin": "https://evil.example"})
        assert answer.status_code == 403


def test_the_gateway_api_keeps_its_own_guard(tmp_path: Path) -> None:
    with client(tmp_path, api_keys=KEY) as http:
        assert http.get("/credits/plans").status_code == 401
        assert http.get("/credits/plans", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_pages_escape_what_users_wrote_and_forbid_inline_scripts(tmp_path: Path) -> None:
    with client(tmp_path) as http:
        page = http.get("/console/account", params={"user_id": "<script>alert(1)</script>"})
        assert page.status_code == 200
        assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)" in page.text
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
