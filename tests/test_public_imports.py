"""The import paths README.md and docs/ promise."""

from __future__ import annotations

import creditworker
from creditworker.engine import CreditService, SubscriptionService


def test_the_documented_import_paths_name_the_engine_services() -> None:
    from creditworker import CreditService as Documented
    from creditworker import SubscriptionService as DocumentedSubscriptions

    assert Documented is CreditService
    assert DocumentedSubscriptions is SubscriptionService
    assert {"CreditService", "SubscriptionService", "Settings", "get_settings", "app"} <= set(creditworker.__all__)
