"""Beat stopped by SIGTERM in the middle of a publish exits, and the message it was writing
reaches the queue whole (creditworker/worker/beat_stop.py).

Celery's own handler closes the broker connection from inside the signal handler; on
RabbitMQ, py-amqp then waits for the frame lock the interrupted write holds, and beat hangs
for good. tests/faults/term_point.py places the signal inside that write every run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from beat_schedule import PERIODIC_TASKS
from creditworker.settings import Settings
from creditworker.worker.app import make_celery
from tests.e2e.conftest import worker_env
from tests.harness import launch, with_checkout_on_path

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

INTERVAL = "4"
"""The relay's interval: its first run is due that long after beat starts, and its message
expires from the queue that long after it was sent (Celery sets `expiration` from the entry's
`expires`), time enough for this test to read it after beat exits."""
EXIT_BOUND = 30.0
"""Seconds from beat's start to its exit: its start, its first due entry and its shutdown,
with slack for 2 busy cores. A hung beat never exits."""


def test_beat_stopped_mid_publish_exits_and_the_message_arrives_whole(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    env = with_checkout_on_path(worker_env(tmp_path, f"sqlite:///{tmp_path / 'unused.db'}", rabbitmq_url,
                                           CREDITWORKER_RELAY_INTERVAL_SECONDS=INTERVAL))
    app = make_celery(Settings(broker_url=rabbitmq_url, database_url="sqlite://"))
    with app.connection_for_write() as connection:
        app.control.purge(connection=connection)
    log_path = tmp_path / "beat.log"
    beat = launch([sys.executable, "-m", "celery", "-A", "tests.faults.term_point", "beat",
                   "--loglevel=INFO", f"--schedule={tmp_path / 'beat.schedule'}"], env, tmp_path, log_path)
    try:
        code = beat.wait(EXIT_BOUND)
    except subprocess.TimeoutExpired:
        beat.send_signal(signal.SIGKILL)
        beat.wait(10)
        pytest.fail(f"beat still running {EXIT_BOUND} s after its start:\n{log_path.read_text()[-3000:]}")
    log = log_path.read_text()
    assert "SIGTERM in the middle of a publish" in log, log[-3000:]
    assert code == 0, log[-3000:]
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        message = channel.basic_get("celery", no_ack=True)
        assert message is not None, f"the publish beat was writing never arrived:\n{log[-3000:]}"
        assert message.headers["task"] in {task for _entry, task, _setting in PERIODIC_TASKS}
        args, kwargs, _embed = json.loads(message.body)  # the whole body, as Celery's protocol 2 has it
        assert isinstance(args, list) and isinstance(kwargs, dict)
        assert channel.basic_get("celery", no_ack=True) is None, "beat published more after the signal"
