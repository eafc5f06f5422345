"""docker-compose.yml runs what the end-to-end tests run (no Docker engine runs here)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from creditworker.settings import Settings
from creditworker.worker import commands

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
APP_SERVICES = ["migrate", "worker", "beat", "flower", "gateway"]
DOCUMENTED_MINIMUM = {
    "POSTGRES_PASSWORD": "pg-secret",
    "FLOWER_BASIC_AUTH": "admin:flower-secret",
    "CREDITWORKER_API_KEYS": "key1",
}
"""What the README says `docker compose up` needs, and nothing else."""

VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """`${VAR:?message}` with VAR unset: compose refuses to start."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's substitution: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
    `${VAR:?error}`, `${VAR?error}`, `${VAR:+other}`, `${VAR+other}`."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value = env.get(name)
        operator, argument = match["operator"], match["argument"] or ""
        if operator is None:
            return value or ""
        missing = value is None or (operator.startswith(":") and value == "")
        if operator.endswith("-"):
            return argument if missing else str(value)
        if operator.endswith("?"):
            if missing:
                raise MissingVariable(f"{name}: {argument}")
            return str(value)
        return "" if missing else argument

    return VARIABLE.sub(substitute, text)


def interpolated(node: Any, env: Mapping[str, str]) -> Any:
    """The compose file as `docker compose config` would see it with `env` in the shell."""
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def settings_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a container of `service` builds from its environment."""
    for name in [name for name in os.environ if name.startswith("CREDITWORKER_")]:
        monkeypatch.delenv(name)
    for name, value in service["environment"].items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def test_every_service_of_the_stack_is_there() -> None:
    assert set(SERVICES) == {"postgres", "redis", "migrate", "worker", "beat", "flower", "gateway"}


def test_app_commands_are_the_canonical_ones_the_e2e_tests_run() -> None:
    assert SERVICES["migrate"]["command"] == commands.MIGRATE
    assert SERVICES["worker"]["command"] == commands.WORKER
    assert SERVICES["beat"]["command"] == commands.beat_command("/data/celerybeat-schedule")
    assert SERVICES["flower"]["command"] == commands.flower_command(
        5555, "${FLOWER_BASIC_AUTH:?set FLOWER_BASIC_AUTH=user:password}"
    )
    assert SERVICES["gateway"]["command"] == commands.serve_command("0.0.0.0", 8000)


def test_dependencies_wait_for_health_or_completion() -> None:
    for name, service in SERVICES.items():
        for dependency, condition in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency == "migrate" else "service_healthy"
            assert condition == {"condition": expected}, (name, dependency)
            if expected == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], dependency
    assert "migrate" in SERVICES["worker"]["depends_on"]


def test_app_services_are_configured_by_environment() -> None:
    for name in ("migrate", "worker", "beat", "flower", "gateway"):
        env = SERVICES[name]["environment"]
        assert env["CREDITWORKER_DATABASE_URL"].startswith("postgresql+psycopg2://")
        assert env["CREDITWORKER_BROKER_URL"].startswith("redis://redis:")


def test_no_secret_is_hard_coded_and_flower_requires_auth() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "--basic-auth=${FLOWER_BASIC_AUTH:?" in text
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert not re.search(r"password\s*[:=]\s*[A-Za-z0-9]{4,}\b(?!\})", text, re.IGNORECASE)
    assert "FLOWER_UNAUTHENTICATED_API" not in text
    assert SERVICES["gateway"]["environment"]["CREDITWORKER_API_KEYS"].startswith("${CREDITWORKER_API_KEYS:?")


def test_redis_keeps_queued_tasks_across_restarts() -> None:
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${UNSET:-}|", env) == "x d  d |"
    assert interpolate("$$HOSTNAME ${SET:+y} ${EMPTY:+y} $SET", env) == "$HOSTNAME y  x"
    with pytest.raises(MissingVariable, match="EMPTY: say so"):
        interpolate("${EMPTY:?say so}", env)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_builds_its_settings_from_the_documented_minimum(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = interpolated(COMPOSE, DOCUMENTED_MINIMUM)["services"][name]
    settings = settings_of(service, monkeypatch)
    assert settings.database_url == (
        "postgresql+psycopg2://creditworker:pg-secret@postgres:5432/creditworker"
    )
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.result_backend == "redis://redis:6379/1"
    assert settings.low_credit_threshold is None  # passed through as an empty string
    assert (settings.payment_provider, settings.topup_stale_after_seconds,
            settings.charge_topups_interval_seconds) == ("manual", 300, 60)  # the same: the defaults
    if name == "gateway":
        assert settings.api_keys == "key1"


OPTIONAL_SETTINGS = {
    "CREDITWORKER_LOW_CREDIT_THRESHOLD": ("low_credit_threshold", "25", 25),
    "CREDITWORKER_PAYMENT_PROVIDER": ("payment_provider", "mybilling.stripe_topups:provider",
                                      "mybilling.stripe_topups:provider"),
    "CREDITWORKER_TOPUP_STALE_AFTER_SECONDS": ("topup_stale_after_seconds", "120", 120),
    "CREDITWORKER_CHARGE_TOPUPS_INTERVAL_SECONDS": ("charge_topups_interval_seconds", "15", 15),
}
"""Variables an operator may set in the shell (or .env): setting, value set, value read."""


def test_an_optional_variable_set_in_the_shell_reaches_the_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {**DOCUMENTED_MINIMUM, **{name: given for name, (_, given, _) in OPTIONAL_SETTINGS.items()}}
    for name in APP_SERVICES:
        settings = settings_of(interpolated(COMPOSE, env)["services"][name], monkeypatch)
        for setting, _, read in OPTIONAL_SETTINGS.values():
            assert getattr(settings, setting) == read, (name, setting)


@pytest.mark.parametrize("required", sorted(DOCUMENTED_MINIMUM))
def test_the_stack_refuses_to_start_without_each_documented_variable(required: str) -> None:
    env = {name: value for name, value in DOCUMENTED_MINIMUM.items() if name != required}
    with pytest.raises(MissingVariable, match=required):
        interpolated(COMPOSE, env)


def test_flower_and_the_gateway_are_published_on_loopback_only() -> None:
    published = {name: service["ports"] for name, service in SERVICES.items() if "ports" in service}
    assert published == {"flower": ["127.0.0.1:5555:5555"], "gateway": ["127.0.0.1:8000:8000"]}
