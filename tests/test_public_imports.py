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


def test_producers_keeps_the_client_names_at_their_old_paths() -> None:
    """The client lives in creditworker.client; `producers` (documented) and its old modules
    `producers.client` and `producers.aio` hand on the same objects."""
    import producers
    import producers.aio
    import producers.client
    from creditworker import client

    for name in ("CreditClient", "AsyncCreditClient", "TaskHandle", "AsyncTaskHandle"):
        assert getattr(producers, name) is getattr(client, name)
    assert producers.client.unwrap is client.unwrap
    assert producers.client.DEFAULT_TIMEOUT == client.DEFAULT_TIMEOUT
    assert producers.aio.AsyncCreditClient is client.AsyncCreditClient
