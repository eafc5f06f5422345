"""Settings from the environment: an empty variable means unset, for every setting."""

from __future__ import annotations

import os

import pytest

from creditworker.settings import Settings

FIELDS = sorted(Settings.model_fields)


@pytest.fixture(autouse=True)
def no_creditworker_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("CREDITWORKER_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("field", FIELDS)
def test_an_empty_variable_gives_the_default(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    default = getattr(Settings(), field)
    monkeypatch.setenv(f"CREDITWORKER_{field.upper()}", "")
    assert getattr(Settings(), field) == default


def test_every_variable_empty_at_once_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in FIELDS:
        monkeypatch.setenv(f"CREDITWORKER_{field.upper()}", "")
    assert Settings() == Settings.model_construct()


def test_off_turns_the_ledger_file_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITWORKER_LEDGER_PATH", "off")
    assert Settings().ledger_path is None
    monkeypatch.setenv("CREDITWORKER_LEDGER_PATH", "ledger.jsonl")
    assert Settings().ledger_path == "ledger.jsonl"
