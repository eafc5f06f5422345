"""docker-compose.yml runs what the end-to-end tests run (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from creditworker.worker import commands

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


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
