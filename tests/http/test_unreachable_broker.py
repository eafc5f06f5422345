"""A broker that is down is reported fast, by its URL without the password (issue 30).

The producer used to wait 6 to 10 s and name no URL; the gateway answered 503 after 10 s.
Now both give up after `broker_connect_timeout_seconds` (2 s by default)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from creditworker.contract.errors import ServiceUnavailable
from creditworker.http.api.app import create_app
from creditworker.settings import Settings
from producers import CreditClient
from tests import services

FAST_ENOUGH_SECONDS = 3.5
"""The default timeout (2 s) plus the machine's slack."""


KINDS = ["amqp", "redis"]


def closed_broker(kind: str) -> tuple[str, str]:
    """A broker URL on a port nothing listens on, and how a message should show it. Made in
    the test, not at collection: test ids must be the same in every pytest-xdist process."""
    port = services.free_port()
    if kind == "amqp":
        return f"amqp://guest:s3cret@127.0.0.1:{port}//", f"amqp://guest:**@127.0.0.1:{port}//"
    return f"redis://:s3cret@127.0.0.1:{port}/0", f"redis://:**@127.0.0.1:{port}/0"


@pytest.mark.parametrize("kind", KINDS)
def test_the_producer_gives_up_on_a_closed_broker_fast_naming_its_url(tmp_path: Path, kind: str) -> None:
    broker_url, shown = closed_broker(kind)
    client = CreditClient(Settings(broker_url=broker_url, data_dir=str(tmp_path)))
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as refused:
        client.add_credits("bob", 5, idempotency_key="unreachable-1")
    assert time.monotonic() - started < FAST_ENOUGH_SECONDS
    message = str(refused.value)
    assert shown in message and "s3cret" not in message
    assert "\n" not in message


def test_the_timeout_is_a_setting(tmp_path: Path) -> None:
    broker_url, _shown = closed_broker("amqp")
    client = CreditClient(Settings(broker_url=broker_url, data_dir=str(tmp_path),
                                   broker_connect_timeout_seconds=0.5))
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        client.add_credits("bob", 5)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("kind", KINDS)
def test_the_gateway_answers_503_fast_naming_the_broker(tmp_path: Path, kind: str) -> None:
    broker_url, shown = closed_broker(kind)
    settings = Settings(broker_url=broker_url, data_dir=str(tmp_path), api_keys="k1",
                        database_url=f"sqlite:///{tmp_path / 'gateway.db'}")
    http = TestClient(create_app(settings), headers={"Authorization": "Bearer k1"})
    started = time.monotonic()
    response = http.post("/credits/add", json={"user_id": "bob", "amount": 5})
    assert time.monotonic() - started < FAST_ENOUGH_SECONDS
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert shown in response.json()["error"]["message"]
    assert "s3cret" not in response.text
