"""Event ids: random version-4 UUIDs, never repeated, not even by a forked child."""

from __future__ import annotations

import os
import uuid

from creditworker.engine.unit_of_work import new_event_id


def test_event_ids_are_distinct_version_4_uuids() -> None:
    ids = [new_event_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:600]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_draws_ids_of_its_own() -> None:
    new_event_id()  # the parent holds a pool of ids drawn ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_event_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child != new_event_id()
    assert uuid.UUID(child).version == 4
