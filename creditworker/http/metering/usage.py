"""Reading the usage an endpoint reports: numbers in whatever JSON form, and token counts.

A usage is never trusted to be a clean integer: APIs send `12`, `12.0`, `"12"` or `1e3` for
the same count, and a bug may send `-5`, `true` or `[12]`. Whole numbers in any form count
as themselves and fractions round up; anything else is a `UsageError`, which the middleware
logs and treats as no usage at all (its `on_missing_usage` policy), so that a malformed
report never crashes a response and never makes a negative charge.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

TOO_LARGE = 10**18
"""Counts above this are not parsed further: far above any charge the engine accepts
(`MAX_AMOUNT`), so the caller refuses them like any overage, without computing with them."""

_MAX_TEXT = 64
"""A number sent as text longer than this is not a count (and `1e999999999` is not worth
expanding)."""


class UsageError(ValueError):
    """A reported usage that cannot be charged: why, in words fit for a log line."""


def count(value: Any, *, what: str = "usage") -> Fraction:
    """`value` as a non-negative number (exact): int, float or numeric text; a count above
    `TOO_LARGE` comes back as `TOO_LARGE + 1`.

    Raises `UsageError` for booleans, lists, mappings, None, text that is not a number,
    NaN, infinities and negative numbers.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise UsageError(f"{what} is {type(value).__name__} {_shown(value)}, not a number")
    if isinstance(value, int):
        number = Decimal(value)
    else:
        text = value if isinstance(value, str) else repr(value)
        if len(text) > _MAX_TEXT:
            raise UsageError(f"{what} is {_shown(value)}, not a number")
        try:
            number = Decimal(text.strip())
        except InvalidOperation:
            raise UsageError(f"{what} is {_shown(value)}, not a number") from None
    if not number.is_finite():
        raise UsageError(f"{what} is {_shown(value)}, not a finite number")
    if number < 0:
        raise UsageError(f"{what} is {_shown(value)}, a negative number")
    if number > TOO_LARGE:
        return Fraction(TOO_LARGE + 1)
    return Fraction(number)


def whole_credits(value: Any, *, what: str = "usage") -> int:
    """`value` as credits: a whole number as itself, a fraction rounded up."""
    number = count(value, what=what)
    return -(-number.numerator // number.denominator)


def token_counts(usage: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A usage object split into kinds and parts of kinds, values as sent (checked later).

    OpenAI-style usage nests parts of a kind under `<kind>_details`
    (`prompt_tokens_details.cached_tokens` is part of `prompt_tokens`); Anthropic-style usage
    has only top-level kinds. Values that are not counts of anything (None, text such as a
    service tier, other nested objects) are left for the rate card to ignore unless it
    prices them.
    """
    kinds: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for name, value in usage.items():
        if isinstance(value, Mapping):
            if name.endswith("_details"):
                parts[name[: -len("_details")]] = dict(value)
            continue
        kinds[name] = value
    return kinds, parts


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
