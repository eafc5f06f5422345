"""The cyclic collector pauses while batches run and comes back as the application left it."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from creditworker.engine.unit_of_work import collector_paused


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    (gc.enable if enabled else gc.disable)()


def test_paused_inside_nested_batches_and_enabled_after_the_last() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_enabled_again_when_the_batch_raised() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("refused")
    assert gc.isenabled()


def test_a_collector_the_application_disabled_stays_disabled() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_batches_in_threads_enable_it_only_when_the_last_one_ends() -> None:
    gc.enable()
    first_in, second_done, seen = threading.Event(), threading.Event(), []

    def first() -> None:
        with collector_paused():
            first_in.set()
            second_done.wait(5)
            seen.append(gc.isenabled())

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with collector_paused():
        pass
    second_done.set()
    thread.join(5)
    assert seen == [False]
    assert gc.isenabled()
