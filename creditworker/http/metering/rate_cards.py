"""Rate cards: what a model's tokens cost, in credits, per kind of token.

AI pricing is per model and per kind of token (prompt, completion, cached prompt), so a
card maps each model name to credits per million tokens of each kind, with an optional
`default` entry for models it does not name:

    card = RateCard({"gpt-4o-mini": {"prompt_tokens": 150_000, "completion_tokens": 600_000,
                                     "cached_tokens": 75_000},
                     "default": {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}})
    card.price("gpt-4o-mini", {"prompt_tokens": 9, "completion_tokens": 12})   # -> 9 credits

A request costs the sum over its kinds, rounded up to a whole credit (per request, not per
kind). A kind nested under `<kind>_details` is a part of `<kind>` (OpenAI's
`prompt_tokens_details.cached_tokens` is part of `prompt_tokens`): when the card prices the
part, those tokens are charged at the part's rate and the rest of the kind at its own.
`total_tokens` is the sum of the others and is charged only if the card prices it and no
other kind. A count of a kind the card does not price is an error (`UsageError`), never a
free token. The card is checked when it is built (so a middleware given a bad card fails
when the app starts): prices are non-negative numbers.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any

from creditworker.http.metering.usage import UsageError, count, token_counts

DEFAULT_MODEL = "default"
PER_TOKENS = 1_000_000
"""Prices are credits per this many tokens."""


class UnknownModel(LookupError):
    """No rate for the model, and the card has no `default`: the request cannot be priced."""


class RateCard:
    """Model name -> credits per million tokens of each kind. Immutable once built."""

    def __init__(self, rates: Mapping[str, Mapping[str, Any]] | str | Path) -> None:
        source = load(rates) if isinstance(rates, (str, Path)) else rates
        if not isinstance(source, Mapping) or not source:
            raise ValueError("a rate card maps model names to their prices; this one names none")
        self._rates: dict[str, dict[str, Fraction]] = {
            str(model): _checked_prices(str(model), prices) for model, prices in source.items()
        }

    @property
    def models(self) -> list[str]:
        return sorted(self._rates)

    def rates_for(self, *models: str | None) -> tuple[str, dict[str, Fraction]]:
        """The first of `models` the card names, else `default`: (its name, its prices)."""
        for model in models:
            if model is not None and model in self._rates:
                return model, self._rates[model]
        if DEFAULT_MODEL in self._rates:
            return DEFAULT_MODEL, self._rates[DEFAULT_MODEL]
        named = ", ".join(repr(model) for model in models if model is not None) or "no model"
        raise UnknownModel(f"the rate card has no price for {named} and no {DEFAULT_MODEL!r} entry")

    def price(self, model: str | None, usage: Mapping[str, Any], *also: str | None) -> int:
        """Credits for `usage` (a usage object: token kind -> count) on `model` (or the first
        of `also` the card names, else `default`), rounded up to a whole credit.

        Raises `UnknownModel`, or `UsageError` for a count that is not a non-negative number,
        a part larger than its kind, or tokens of a kind the card does not price.
        """
        name, rates = self.rates_for(model, *also)
        kinds, parts = token_counts(usage)
        priced = [kind for kind in kinds if kind in rates and kind != "total_tokens"]
        if not priced and "total_tokens" in rates and "total_tokens" in kinds:
            priced = ["total_tokens"]
        if not priced:
            raise UsageError(f"usage {sorted(kinds)} names no token kind that {name!r} prices "
                             f"({sorted(rates)})")
        cost = Fraction(0)
        for kind, value in kinds.items():
            if kind in priced:
                tokens = count(value, what=f"usage {kind}")
                for part, part_value in parts.get(kind, {}).items():
                    if part in rates and part not in kinds:
                        part_tokens = count(part_value, what=f"usage {kind}_details.{part}")
                        if part_tokens > tokens:
                            raise UsageError(f"usage {kind}_details.{part} ({part_tokens}) is more "
                                             f"than {kind} ({tokens})")
                        cost += part_tokens * rates[part]
                        tokens -= part_tokens
                cost += tokens * rates[kind]
            elif kind != "total_tokens" and _is_count(value) and count(value) > 0:
                raise UsageError(f"usage has {kind}, which {name!r} does not price "
                                 f"(the card prices {sorted(rates)})")
        return math.ceil(cost / PER_TOKENS)

    def estimate(self, model: str | None, tokens: int) -> int:
        """Credits to hold for `tokens` of any kind: priced at the model's highest rate (the
        card's highest of all when the request names no model and there is no default);
        at least 1, since a hold is never empty."""
        try:
            _name, rates = self.rates_for(model)
        except UnknownModel:
            if model is not None:
                raise
            rates = {kind: rate for prices in self._rates.values() for kind, rate in prices.items()}
        highest = max(rates.values(), default=Fraction(0))
        return max(1, math.ceil(tokens * highest / PER_TOKENS))


def load(path: str | Path) -> Mapping[str, Any]:
    """A rate card file: TOML (`.toml`) or JSON (anything else)."""
    file = Path(path)
    text = file.read_text()
    try:
        loaded = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ValueError(f"rate card {file}: {exc}") from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"rate card {file}: the top level must map model names to prices")  # noqa: TRY004
    return loaded


def _checked_prices(model: str, prices: Any) -> dict[str, Fraction]:
    if not isinstance(prices, Mapping) or not prices:
        raise ValueError(
            f"rate card: {model!r} must map token kinds to credits per {PER_TOKENS:,} tokens, "
            f"not {prices!r}")
    checked: dict[str, Fraction] = {}
    for kind, price in prices.items():
        if isinstance(price, bool) or not isinstance(price, (int, float, str, Decimal)):
            raise ValueError(  # noqa: TRY004
                f"rate card: {model!r} {kind!r} costs {price!r}, which is not a number")
        try:
            number = Decimal(price if isinstance(price, (int, Decimal)) else str(price).strip())
        except InvalidOperation:
            raise ValueError(f"rate card: {model!r} {kind!r} costs {price!r}, which is not a number") from None
        if not number.is_finite() or number < 0:
            raise ValueError(f"rate card: {model!r} {kind!r} costs {price!r}: a price is a "
                             f"non-negative number")
        checked[str(kind)] = Fraction(number)
    return checked


def _is_count(value: Any) -> bool:
    """Whether a value of an unpriced kind claims to count tokens (numbers, numeric text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        count(value)
    except UsageError:
        return isinstance(value, (int, float))  # a negative number still claims to count
    return True
