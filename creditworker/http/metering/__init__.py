"""Metering for ASGI apps: reserve an estimate, run the endpoint, charge the real usage.

`middleware` (the ASGI middleware), `meters` (how it reaches the engine: in process or
through the workers), `rate_cards` (credits per model and kind of token), `streams` (reading
streamed events as they pass), `usage` (numbers in whatever JSON form).
"""

from creditworker.http.metering.middleware import CreditDeductionMiddleware
from creditworker.http.metering.rate_cards import RateCard, UnknownModel

__all__ = ["CreditDeductionMiddleware", "RateCard", "UnknownModel"]
