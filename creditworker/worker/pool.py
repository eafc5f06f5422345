"""Celery's prefork pool, with threads that stop at once.

billiard's `TimeoutHandler` checks time limits once a second with `time.sleep(1.0)` and its
`Supervisor` checks the processes every 0.8 s the same way, and the pool joins both when it
stops: an idle worker waited for those sleeps to end. These wait on an event that closing
the pool sets.
Set as `worker_pool` (worker/app.py): `--pool=prefork` on the command line then picks it, so
the command lines stay Celery's own (tests/e2e/test_quiet_up.py times the stop).
"""

from __future__ import annotations

import threading
from typing import Any

from billiard.common import restart_state
from billiard.exceptions import RestartFreqExceeded
from billiard.pool import RUN, CoroStop, Supervisor, TimeoutHandler
from billiard.pool import Pool as BlockingPool
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool as PreforkTaskPool

CHECK_SECONDS = 1.0
"""How often the time limits are checked (billiard's own period)."""


class PromptTimeoutHandler(TimeoutHandler):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._woken = threading.Event()
        super().__init__(*args, **kwargs)

    def body(self) -> None:
        while self._state == RUN:
            try:
                for _ in self.handle_timeouts():
                    self._woken.wait(CHECK_SECONDS)
            except CoroStop:
                break

    def terminate(self) -> None:
        super().terminate()
        self._woken.set()


class PromptSupervisor(Supervisor):  # type: ignore[misc]
    """billiard's, whose 0.8 s pauses between pool checks end when the pool closes (the
    pool's `close` joins this thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._woken = threading.Event()
        super().__init__(*args, **kwargs)

    def body(self) -> None:
        pool = self.pool
        self._woken.wait(0.8)
        try:
            previous = pool.restart_state
            pool.restart_state = restart_state(10 * pool._processes, 1)
            for _ in range(10):
                if self._state == RUN and pool._state == RUN:
                    pool._maintain_pool()
                    self._woken.wait(0.1)
            pool.restart_state = previous
            while self._state == RUN and pool._state == RUN:
                pool._maintain_pool()
                self._woken.wait(0.8)
        except RestartFreqExceeded:
            pool.close()
            pool.join()
            raise

    def close(self) -> None:
        super().close()
        self._woken.set()

    def terminate(self) -> None:
        super().terminate()
        self._woken.set()


class PromptBlockingPool(BlockingPool):  # type: ignore[misc]
    TimeoutHandler = PromptTimeoutHandler
    Supervisor = PromptSupervisor


class PromptAsynPool(AsynPool):  # type: ignore[misc]
    TimeoutHandler = PromptTimeoutHandler
    Supervisor = PromptSupervisor


class TaskPool(PreforkTaskPool):  # type: ignore[misc]
    Pool = PromptAsynPool
    BlockingPool = PromptBlockingPool
