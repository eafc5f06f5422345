"""A producer on the embedded broker that no worker reads says where its message waits."""

from __future__ import annotations

from pathlib import Path

import pytest

from creditworker.contract.errors import ServiceUnavailable
from creditworker.settings import Settings
from producers import CreditClient

pytestmark = pytest.mark.e2e


def test_no_answer_on_the_embedded_broker_names_the_data_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "elsewhere" / ".creditworker"
    client = CreditClient(Settings(data_dir=str(data_dir)))
    with pytest.raises(ServiceUnavailable) as raised:
        client.add_credits("alice", 5).get(timeout=1)
    message = raised.value.message
    assert f"the embedded broker in {data_dir}: no worker consumes it?" in message
    assert f"Start `creditworker up` in {data_dir.parent}" in message
    assert raised.value.details["applied"] is None  # still queued: a worker started there applies it
