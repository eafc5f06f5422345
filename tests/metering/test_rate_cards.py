"""Rate cards on their own: prices per model and kind, rounding, and cards refused at start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from creditworker import CreditService
from creditworker.http.metering.middleware import CreditDeductionMiddleware
from creditworker.http.metering.rate_cards import RateCard, UnknownModel
from creditworker.http.metering.usage import UsageError
from tests.metering.serving import CARD

card = RateCard(CARD)


def test_a_request_costs_its_kinds_at_their_rates_rounded_up_once() -> None:
    # 9 * 0.15 + 12 * 0.6 = 8.55: one credit up for the request, not per kind
    assert card.price("gpt-4o-mini", {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}) == 9
    assert card.price("gpt-4o-mini", {"prompt_tokens": 0, "completion_tokens": 0}) == 0


def test_cached_tokens_are_a_part_of_the_prompt_at_their_own_rate() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100,
             "prompt_tokens_details": {"cached_tokens": 600}, "completion_tokens_details": {"reasoning_tokens": 50}}
    assert card.price("gpt-4o-mini", usage) == 165  # 400 * 0.15 + 600 * 0.075 + 100 * 0.6
    assert card.price("big-model", usage) == 3500  # cached not priced there: the whole prompt at 2.5


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 1, "audio_tokens": 3},  # a kind the card does not price
    {"total_tokens": 30},  # only the sum: no kind the card prices
    {"prompt_tokens": -1}, {"prompt_tokens": True}, {"prompt_tokens": [1]}, {"prompt_tokens": "x"},
    {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 6}},  # a part above its kind
])
def test_usage_that_cannot_be_priced_is_an_error_never_a_free_token(usage: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        card.price("gpt-4o-mini", usage)


def test_text_and_empty_values_of_kinds_the_card_does_not_price_are_not_counts() -> None:
    usage = {"input_tokens": 10, "output_tokens": 2, "service_tier": "standard", "cache_creation": {"x": 1},
             "server_tool_use": None}
    anthropic = RateCard({"claude": {"input_tokens": 3_000_000, "output_tokens": 15_000_000}})
    assert anthropic.price("claude", usage) == 60


def test_the_default_entry_prices_unknown_models_and_without_it_they_are_refused() -> None:
    with pytest.raises(UnknownModel, match="'gpt-9'"):
        card.price("gpt-9", {"prompt_tokens": 1})
    with_default = RateCard({**CARD, "default": {"prompt_tokens": 1_000_000}})
    assert with_default.price("gpt-9", {"prompt_tokens": 3}) == 3
    assert card.price("gpt-4o-mini-2024-07-18", {"prompt_tokens": 100}, "gpt-4o-mini") == 15  # the fallback


def test_the_estimate_is_priced_at_the_models_highest_rate() -> None:
    assert card.estimate("gpt-4o-mini", 100) == 60
    assert card.estimate("gpt-4o-mini", 1) == 1  # 0.6, rounded up
    assert card.estimate(None, 10) == 100  # no model, no default: the card's highest rate
    with pytest.raises(UnknownModel):
        card.estimate("gpt-9", 10)


def test_cards_load_from_toml_and_json_files(tmp_path: Path) -> None:
    toml = tmp_path / "card.toml"
    toml.write_text('["gpt-4o-mini"]\nprompt_tokens = 150000\ncompletion_tokens = 600000\n'
                    '[default]\nprompt_tokens = 0.5\n')
    as_json = tmp_path / "card.json"
    as_json.write_text(json.dumps({"gpt-4o-mini": {"prompt_tokens": "150000", "completion_tokens": 600000}}))
    for path in (toml, str(as_json)):
        assert RateCard(path).price("gpt-4o-mini", {"prompt_tokens": 9, "completion_tokens": 12}) == 9
    assert RateCard(toml).price("other", {"prompt_tokens": 3_000_000}) == 2


@pytest.mark.parametrize("rates", [
    {"m": {"prompt_tokens": -1}}, {"m": {"prompt_tokens": "cheap"}}, {"m": {"prompt_tokens": True}},
    {"m": {"prompt_tokens": None}}, {"m": {"prompt_tokens": float("nan")}}, {"m": {}}, {"m": 5}, {},
])
def test_a_card_with_a_negative_or_non_numeric_price_is_refused(rates: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="rate card"):
        RateCard(rates)


def test_a_middleware_with_a_bad_card_fails_when_the_app_starts(tmp_path: Path) -> None:
    app = FastAPI()
    credits = CreditService(f"sqlite:///{tmp_path / 'c.db'}")
    app.add_middleware(CreditDeductionMiddleware, credit_service=credits,
                       rate_card={"gpt-4o-mini": {"prompt_tokens": -0.15}})
    with pytest.raises(ValueError, match="non-negative"), TestClient(app):
        pass
