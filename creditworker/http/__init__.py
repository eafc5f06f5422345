"""HTTP adapters for FastAPI apps (the `http` extra): the `/credits` router and the
reserve-then-deduct middleware, each in process (on an engine object) or through the workers.

    from creditworker.http import router, CreditDeductionMiddleware
    app.include_router(router)                      # in process, on get_credit_service()
    app.add_middleware(CreditDeductionMiddleware, credit_service=credits)
"""

from creditworker.http.api.deps import get_credit_service
from creditworker.http.api.routing import build_router, router
from creditworker.http.metering.middleware import CreditDeductionMiddleware

__all__ = ["CreditDeductionMiddleware", "build_router", "get_credit_service", "router"]
