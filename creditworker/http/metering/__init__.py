"""Metering for ASGI apps: reserve an estimate, run the endpoint, charge the real usage.

`middleware` (the ASGI middleware), `meters` (how it reaches the engine: in process or
through the workers).
"""

from creditworker.http.metering.middleware import CreditDeductionMiddleware

__all__ = ["CreditDeductionMiddleware"]
